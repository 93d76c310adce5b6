"""The dashboard in a real browser: Debian's headless Chromium driven by
playwright, against real master and worker processes.

One browser, and one master with one worker, serve the whole module (each
test its own queues and its own browser context); the token test starts its
own master. Every wait is playwright's own expect-with-deadline or a poll.
"""

from __future__ import annotations

import http.server
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Dialog, Page, expect, sync_playwright

from taskfleet.common.client import Client
from taskfleet.common.model import TaskState

from dashboard_http import call, dashboard_master
from procs import MasterProc, WorkerProc, free_port, poll
from system import missing

TIMEOUT_MS = 15_000
SERVED = f"dash-{uuid.uuid4().hex[:6]}"  # the queue the module's worker serves


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        missing("chromium is not installed (Debian package chromium; `make system-deps`)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MasterProc, str]]:
    """A master serving its dashboard, with a worker on the queue SERVED."""
    log_dir = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    master = MasterProc(log_dir, extra=["--http-listen", f"127.0.0.1:{port}"])
    worker = None
    try:
        worker = WorkerProc(log_dir, master.address, queues=SERVED)
        yield master, f"http://127.0.0.1:{port}"
    finally:
        for proc in (worker, master):
            if proc is not None:
                proc.kill()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page (its own cookies) that accepts every confirmation it is asked."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    yield page
    context.close()


@pytest.fixture
def client(site: tuple[MasterProc, str]) -> Iterator[Client]:
    with site[0].client() as c:
        yield c


def new_queue() -> str:
    return f"q-{uuid.uuid4().hex[:8]}"


def failed_task(client: Client, message: str) -> str:
    task_id = client.submit("boom", [message], queue=SERVED)
    (task,) = client.wait([task_id], timeout_s=30)
    assert task.state is TaskState.FAILED
    return task_id


def test_the_overview_shows_queues_and_workers(
    site: tuple[MasterProc, str], client: Client, page: Page
) -> None:
    # Given a task that ran on the module's worker
    task_id = client.submit("square", [4], queue=SERVED)
    assert client.result(task_id, timeout_s=30) == 16
    (worker,) = client.stats().workers

    # When the overview opens, then it shows the queue's counts and the worker
    page.goto(site[1] + "/")
    row = page.locator(f'#queues tr[data-queue="{SERVED}"]')
    expect(row.locator("td").nth(3)).to_have_text("1")  # succeeded
    worker_row = page.locator(f'#workers tr[data-worker="{worker.worker_id}"]')
    expect(worker_row).to_contain_text(str(worker.pid))
    expect(worker_row).to_contain_text("0 / 2")


def test_a_submit_to_a_new_queue_appears_live(
    site: tuple[MasterProc, str], client: Client, page: Page
) -> None:
    page.goto(site[1] + "/")
    expect(page.locator("#live")).to_have_text("live")
    page.evaluate("window.notReloaded = true")
    queue = new_queue()

    client.submit("square", [1], queue=queue)

    row = page.locator(f'#queues tr[data-queue="{queue}"]')
    expect(row.locator("td").nth(1)).to_have_text("1")  # pending
    # and the age of its oldest pending task, which goes on counting
    oldest = row.locator("td.oldest")
    expect(oldest).to_have_text(re.compile(r"^\d+ s$"))
    expect(oldest).to_have_text(re.compile(r"^[1-9]\d* s$"))
    assert page.evaluate("window.notReloaded") is True


def test_a_failed_tasks_page_shows_its_traceback(
    site: tuple[MasterProc, str], client: Client, page: Page
) -> None:
    message = f"kaput-{uuid.uuid4().hex[:6]}"
    task_id = failed_task(client, message)

    page.goto(f"{site[1]}/tasks/{task_id}")

    expect(page.locator("#state")).to_have_text("failed")
    expect(page.locator("#error-type")).to_have_text("RuntimeError")
    expect(page.locator("#error-message")).to_have_text(message)
    traceback = page.locator("#traceback")
    expect(traceback).to_contain_text("Traceback (most recent call last)")
    expect(traceback).to_contain_text(f"RuntimeError: {message}")
    expect(page.locator("#payload")).to_contain_text(message)


def test_cancel_and_retry_from_the_page(
    site: tuple[MasterProc, str], client: Client, page: Page
) -> None:
    # A pending task (nobody serves its queue) is cancelled from its page
    pending_id = client.submit("square", [2], queue=new_queue())
    page.goto(f"{site[1]}/tasks/{pending_id}")
    expect(page.locator("#state")).to_have_text("pending")
    page.click("#cancel")
    expect(page.locator("#state")).to_have_text("cancelled")
    assert client.get(pending_id).state is TaskState.CANCELLED

    # A failed task is retried from its page: the worker runs it a second time
    failed_id = failed_task(client, "once more")
    page.goto(f"{site[1]}/tasks/{failed_id}")
    page.click("#retry")
    poll(
        lambda: (t := client.get(failed_id)).attempts == 2 and t.state is TaskState.FAILED,
        what="the retried task to fail a second time",
    )
    expect(page.locator("#fields")).to_contain_text("Attempts2")


def test_purge_shows_the_count_and_keeps_the_filter(
    site: tuple[MasterProc, str], client: Client, browser: Browser
) -> None:
    # Given three cancelled tasks in a queue, and one elsewhere
    queue = new_queue()
    ids = [client.submit("square", [i], queue=queue) for i in range(3)]
    for task_id in ids:
        client.cancel(task_id)
    elsewhere = client.submit("square", [9], queue=new_queue())
    client.cancel(elsewhere)
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    questions: list[str] = []

    def answer(dialog: Dialog) -> None:
        questions.append(dialog.message)
        dialog.accept()

    page.on("dialog", answer)
    try:
        # When the tasks page filtered to that queue purges its cancelled tasks
        page.goto(f"{site[1]}/tasks?queue={queue}&state=cancelled")
        expect(page.locator("#tasks tbody tr")).to_have_count(3)
        page.click("#purge")
        expect(page.locator("#message")).to_contain_text("Purge: 3 tasks")
    finally:
        context.close()

    # Then it asked about exactly those three, and only they are gone
    assert questions == [f"Purge 3 cancelled tasks in queue {queue}?"]
    assert list(client.list_tasks(queue=queue)) == []
    assert client.get(elsewhere).state is TaskState.CANCELLED


def test_a_token_protected_master_shows_nothing_without_the_token(
    start_master: Callable[..., MasterProc], page: Page
) -> None:
    master, base = dashboard_master(
        start_master, "--token", "s3cret", client_auth={"token": "s3cret"}
    )
    queue = new_queue()
    with master.client() as client:
        client.submit("square", [3], queue=queue)

    # Without the token: the login form, and nothing of the master's
    page.goto(base + "/")
    expect(page).to_have_url(f"{base}/login?next=/")
    assert queue not in page.content()
    assert page.request.get(f"{base}/api/overview").status == 401

    # With it: everything
    page.fill("input[name=token]", "s3cret")
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{base}/")
    expect(page.locator(f'#queues tr[data-queue="{queue}"]')).to_be_visible()
    assert page.request.get(f"{base}/api/overview").status == 200


class _AttackerPage(http.server.BaseHTTPRequestHandler):
    """Another site's page with a form that posts to the dashboard."""

    target = ""

    def do_GET(self) -> None:
        body = (
            f'<form method="post" action="{self.target}">'
            '<button id="go" type="submit">win a prize</button></form>'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_cross_site_post_is_refused(
    site: tuple[MasterProc, str], client: Client, page: Page, tmp_path: Path
) -> None:
    task_id = client.submit("square", [5], queue=new_queue())
    _AttackerPage.target = f"{site[1]}/api/tasks/{task_id}/cancel"
    attacker = http.server.HTTPServer(("127.0.0.1", 0), _AttackerPage)
    thread = threading.Thread(target=attacker.serve_forever, daemon=True)
    thread.start()
    try:
        # Another origin (localhost, another port) makes the browser post to the dashboard
        page.goto(f"http://localhost:{attacker.server_port}/")
        page.click("#go")
        expect(page.locator("body")).to_contain_text("cross-site request refused")
    finally:
        attacker.shutdown()
        attacker.server_close()
    assert client.get(task_id).state is TaskState.PENDING
    # while the same request from the dashboard's own origin would have worked
    assert call(_AttackerPage.target, "POST", headers={"Origin": site[1]}).status == 200
