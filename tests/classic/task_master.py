# task_master.py: the classic multiprocessing.managers master. It serves a task
# queue and a result queue on a port, puts 10 numbers on the task queue and
# reads 10 results back.
import queue
import random
from multiprocessing.managers import BaseManager

task_queue = queue.Queue()
result_queue = queue.Queue()


def return_task_queue():
    return task_queue


def return_result_queue():
    return result_queue


class QueueManager(BaseManager):
    pass


QueueManager.register("get_task_queue", callable=return_task_queue)
QueueManager.register("get_result_queue", callable=return_result_queue)

if __name__ == "__main__":
    manager = QueueManager(address=("127.0.0.1", 5000), authkey=b"abc")
    manager.start()
    task = manager.get_task_queue()
    result = manager.get_result_queue()
    for _ in range(10):
        n = random.randint(0, 10000)
        print(f"Put task {n}...")
        task.put(n)
    print("Try get results...")
    for _ in range(10):
        r = result.get(timeout=10)
        print(f"Result: {r}")
    manager.shutdown()
    print("master exit.")
