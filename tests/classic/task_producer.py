# task_producer.py: a classic multiprocessing.managers client that hands out
# work. It connects to a master that serves the two queues, puts 10 numbers on
# the task queue and reads 10 results back.
import random
from multiprocessing.managers import BaseManager


class QueueManager(BaseManager):
    pass


QueueManager.register("get_task_queue")
QueueManager.register("get_result_queue")

m = QueueManager(address=("127.0.0.1", 5000), authkey=b"abc")
m.connect()
task = m.get_task_queue()
result = m.get_result_queue()
for _ in range(10):
    n = random.randint(0, 10000)
    print(f"Put task {n}...")
    task.put(n)
print("Try get results...")
for _ in range(10):
    r = result.get(timeout=10)
    print(f"Result: {r}")
print("producer exit.")
