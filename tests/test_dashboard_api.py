"""The dashboard's JSON API and its access rules, over plain HTTP (no browser):
what the pages and scripts rely on, against a real master process."""

from __future__ import annotations

import json
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from taskfleet.common.cli_parser import build_parser
from taskfleet.common.config_flags import master_config
from taskfleet.common.errors import ConfigError
from taskfleet.common.model import TaskState

import pg
from dashboard_http import call, dashboard_master
from procs import MasterProc, WorkerProc, poll
from test_cli import ok, run
from test_security import Pki, pki, tls_flags  # noqa: F401 - pki is a fixture

StartMaster = Callable[..., MasterProc]
TOKEN, READ_TOKEN = "act-secret", "view-secret"


def test_overview_tasks_and_metrics(
    start_master: StartMaster, start_worker: Callable[..., WorkerProc], queue_name: str
) -> None:
    # Given a master with its dashboard, a worker, and tasks that succeed and fail
    master, base = dashboard_master(start_master)
    worker = start_worker(master, queues=queue_name)
    with master.client() as client:
        ok_id = client.submit("square", [7], queue=queue_name)
        bad_id = client.submit("boom", ["kaput"], queue=queue_name)
        list(client.wait([ok_id, bad_id], timeout_s=30))

    # Then the overview counts them per queue and lists the worker
    overview = call(f"{base}/api/overview").json()
    (row,) = [q for q in overview["queues"] if q["queue"] == queue_name]
    assert (row["succeeded"], row["failed"], row["pending"]) == (1, 1, 0)
    (listed,) = overview["workers"]
    assert (listed["pid"], listed["queues"], listed["slots"]) == (worker.pid, [queue_name], 2)
    assert len(overview["masters"]) == 1

    # and a task's page data carries its arguments, result, and error with traceback
    ok = call(f"{base}/api/tasks/{ok_id}").json()
    assert (ok["state"], ok["result"], ok["name"]) == ("succeeded", "49", "square")
    assert json.loads(ok["payload"])["args"] == [7]
    bad = call(f"{base}/api/tasks/{bad_id}").json()
    assert bad["state"] == "failed"
    assert (bad["error"]["type"], bad["error"]["message"]) == ("RuntimeError", "kaput")
    assert "Traceback" in bad["error"]["traceback"]

    # and /metrics on the same listener reads the store
    metrics = call(f"{base}/metrics").body.decode()
    assert f'taskfleet_queue_depth{{queue="{queue_name}",state="failed"}} 1.0' in metrics


def test_the_oldest_pending_task_of_each_queue_is_shown_everywhere(
    start_master: StartMaster, queue_name: str
) -> None:
    # Given, on queues no worker serves, a ready task, and a queue holding only a
    # task delayed by an hour
    master, base = dashboard_master(start_master)
    delayed_queue = f"{queue_name}-later"
    with master.client() as client:
        before = time.time()
        client.submit("square", [1], queue=queue_name)
        after = time.time()
        client.submit("square", [2], queue=queue_name)
        client.submit("square", [3], queue=delayed_queue, not_before=after + 3600)
        client.submit("square", [4], queue=queue_name, not_before=before - 60)  # due already

        # Then the overview gives the time the first one has waited since
        overview = call(f"{base}/api/overview").json()
        rows = {q["queue"]: q for q in overview["queues"]}
        assert before <= rows[queue_name]["oldest_pending_at"] <= after
        assert rows[delayed_queue]["oldest_pending_at"] is None
        assert rows[delayed_queue]["pending"] == 1

        # and GetStats its age (as a time of this clock), which keeps growing
        by_queue = {q.queue: q for q in client.stats().queues}
        assert by_queue[delayed_queue].oldest_pending_at == 0.0
        seen = by_queue[queue_name].oldest_pending_at
        assert abs(seen - rows[queue_name]["oldest_pending_at"]) < 5.0

    # and /metrics as a gauge
    metrics = call(f"{base}/metrics").body.decode()
    gauge = "taskfleet_queue_oldest_pending_age_seconds"
    assert re.search(rf'^{gauge}{{queue="{queue_name}"}} \d', metrics, re.M), metrics
    assert f'{gauge}{{queue="{delayed_queue}"}}' not in metrics

    # and the CLI prints it in seconds, and for people in minutes and seconds
    stats = json.loads(ok(run("stats", "--json", "--master", master.address)))
    ages = {q["queue"]: q["oldest_pending_age_s"] for q in stats["queues"]}
    assert ages[delayed_queue] is None
    assert 0.0 <= ages[queue_name] < time.time() - before + 5.0
    table = ok(run("stats", "--master", master.address))
    queues_table = table.split("\n\n")[0].splitlines()
    assert queues_table[0].split()[-2:] == ["OLDEST", "PENDING"]
    (line,) = [row for row in queues_table if row.startswith(f"{queue_name} ")]
    assert re.search(r"\b\d+ s$", line), line


def test_keyset_pages_filters_and_errors(start_master: StartMaster, queue_name: str) -> None:
    master, base = dashboard_master(start_master)
    with master.client() as client:
        ids = [client.submit("square", [i], queue=queue_name) for i in range(5)]
        client.submit("length", ["x"], queue=queue_name)
        client.cancel(ids[0])

    # Pages of two, newest first, cover every task once
    seen: list[str] = []
    cursor = ""
    while True:
        query = urllib.parse.urlencode(
            {"queue": queue_name, "name": "square", "limit": 2, "cursor": cursor}
        )
        page = call(f"{base}/api/tasks?{query}").json()
        assert len(page["tasks"]) <= 2
        seen += [t["id"] for t in page["tasks"]]
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert seen == ids[::-1]

    # A state filter, and the count a bulk action would touch
    cancelled = call(f"{base}/api/tasks?queue={queue_name}&state=cancelled").json()["tasks"]
    assert [t["id"] for t in cancelled] == [ids[0]]
    assert call(f"{base}/api/count?queue={queue_name}&state=pending").json() == {"count": 5}
    assert call(f"{base}/api/count?queue={queue_name}&name=square").json() == {"count": 5}

    # Bad input is refused with the field named; a final task cannot be cancelled
    answer = call(f"{base}/api/tasks?state=finished")
    assert answer.status == 400
    assert "states[0]" in answer.json()["error"]
    assert call(f"{base}/api/tasks?cursor=nonsense").status == 400
    assert call(f"{base}/api/tasks/no-such-task").status == 404
    assert call(f"{base}/api/tasks/{ids[0]}/cancel", "POST").status == 409


def test_actions_change_what_grpc_sees(start_master: StartMaster, queue_name: str) -> None:
    master, base = dashboard_master(start_master)
    with master.client() as client:
        ids = [client.submit("square", [i], queue=queue_name) for i in range(3)]

        # Cancel one task, then retry it, through the dashboard
        assert call(f"{base}/api/tasks/{ids[0]}/cancel", "POST").json()["state"] == "cancelled"
        assert client.get(ids[0]).state is TaskState.CANCELLED
        assert call(f"{base}/api/tasks/{ids[0]}/retry", "POST").json()["state"] == "pending"
        assert client.get(ids[0]).state is TaskState.PENDING

        # Retry-all and purge act on the filter they are given, and say so
        for task_id in ids:
            client.cancel(task_id)
        retried = call(
            f"{base}/api/retry-all", "POST", {"queue": queue_name, "states": ["cancelled"]}
        ).json()
        assert retried == {
            "count": 3,
            "filter": {"queue": queue_name, "name": "", "states": ["cancelled"]},
        }
        assert {client.get(i).state for i in ids} == {TaskState.PENDING}
        client.cancel(ids[1])
        purged = call(f"{base}/api/purge", "POST", {"queue": queue_name, "states": ["cancelled"]})
        assert purged.json()["count"] == 1
        assert [t.id for t in client.list_tasks(queue=queue_name)] == [ids[2], ids[0]]
        refused = call(f"{base}/api/purge", "POST", {"queue": queue_name, "states": ["pending"]})
        assert refused.status == 400


def test_a_token_guards_everything_and_the_read_token_only_views(
    start_master: StartMaster, queue_name: str
) -> None:
    master, base = dashboard_master(
        start_master,
        "--token",
        TOKEN,
        "--dashboard-read-token",
        READ_TOKEN,
        client_auth={"token": TOKEN},
    )
    with master.client() as client:
        task_id = client.submit("square", [1], queue=queue_name)

    # Without a token: no data, no metrics; pages send the browser to the login form
    for path in ("/api/overview", f"/api/tasks/{task_id}", "/api/events", "/metrics"):
        assert call(base + path).status == 401, path
    assert call(f"{base}/api/overview", headers={"Authorization": "Bearer wrong"}).status == 401
    page = call(f"{base}/tasks?queue={queue_name}")
    assert page.status == 303
    assert page.headers["Location"].startswith("/login?next=/tasks")
    assert queue_name.encode() not in call(f"{base}/login").body
    assert call(f"{base}/static/common.js").status == 200  # no data in it

    # The read token views but may not act
    read = {"Authorization": f"Bearer {READ_TOKEN}"}
    assert call(f"{base}/api/tasks/{task_id}", headers=read).json()["state"] == "pending"
    assert call(f"{base}/api/tasks/{task_id}/cancel", "POST", headers=read).status == 403
    assert call(f"{base}/api/session", headers=read).json() == {"role": "view", "login": True}

    # The login form sets an HttpOnly, SameSite=Strict cookie that is not the token
    login = call(
        f"{base}/login?next=/tasks",
        "POST",
        urllib.parse.urlencode({"token": TOKEN}).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": base},
    )
    assert (login.status, login.headers["Location"]) == (303, "/tasks")
    for elsewhere in ("//evil.example/", "/\\evil.example/", "https://evil.example/"):
        away = call(
            f"{base}/login?" + urllib.parse.urlencode({"next": elsewhere}),
            "POST",
            urllib.parse.urlencode({"token": TOKEN}).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": base},
        )
        assert away.headers["Location"] == "/", elsewhere
    cookie = login.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert TOKEN not in cookie
    session = {"Cookie": cookie.split(";")[0]}
    assert call(f"{base}/api/overview", headers=session).status == 200
    wrong = call(
        f"{base}/login",
        "POST",
        b"token=nope",
        headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": base},
    )
    assert wrong.status == 401
    assert b"Wrong token" in wrong.body

    # Acting with the cookie needs a same-origin browser request; from elsewhere it is refused
    cancel = f"{base}/api/tasks/{task_id}/cancel"
    assert call(cancel, "POST", headers=session).status == 403  # no Origin at all
    evil = {**session, "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert call(cancel, "POST", headers=evil).status == 403
    same = {**session, "Origin": base, "Sec-Fetch-Site": "same-origin"}
    with master.client() as client:
        assert client.get(task_id).state is TaskState.PENDING
        assert call(cancel, "POST", headers=same).json()["state"] == "cancelled"
        assert client.get(task_id).state is TaskState.CANCELLED


def test_a_tokenless_dashboard_refuses_cross_site_requests_and_foreign_hosts(
    start_master: StartMaster, queue_name: str
) -> None:
    master, base = dashboard_master(start_master)
    with master.client() as client:
        task_id = client.submit("square", [1], queue=queue_name)
        cancel = f"{base}/api/tasks/{task_id}/cancel"
        for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "same-site"}):
            answer = call(cancel, "POST", headers=headers)
            assert answer.status == 403
            assert "cross-site" in answer.json()["error"]
        # A name rebound to 127.0.0.1 by another site's DNS is not this dashboard
        assert call(f"{base}/api/overview", headers={"Host": "evil.example"}).status == 403
        assert client.get(task_id).state is TaskState.PENDING


def test_responses_forbid_inline_scripts_and_framing(start_master: StartMaster) -> None:
    _, base = dashboard_master(start_master)
    for path in ("/", "/tasks", "/tasks/some-id", "/api/overview"):
        headers = call(base + path).headers
        policy = headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy, path
        assert "frame-ancestors 'none'" in policy
    assert b"<script>" not in call(f"{base}/").body


def test_masters_sharing_a_postgresql_store_show_the_same_truth(
    start_master: StartMaster, queue_name: str
) -> None:
    with pg.database() as db:
        # Given two masters on one database, each serving its dashboard
        a, base_a = dashboard_master(start_master, store=db)
        _, base_b = dashboard_master(start_master, store=db)
        with a.client() as client:
            kept, cancelled = (client.submit("square", [i], queue=queue_name) for i in range(2))

        # When a task submitted on one is cancelled through the other's dashboard
        answer = call(f"{base_b}/api/tasks/{cancelled}/cancel", "POST")
        assert answer.json()["state"] == "cancelled"

        # Then both dashboards show the same counts, both masters, and the same task
        def same_view() -> bool:
            views = [call(f"{base}/api/overview").json() for base in (base_a, base_b)]
            rows = [[q for q in v["queues"] if q["queue"] == queue_name] for v in views]
            counts = [(r["pending"], r["cancelled"]) for row in rows for r in row]
            return [len(v["masters"]) for v in views] == [2, 2] and counts == [(1, 1), (1, 1)]

        poll(same_view, what="both dashboards to show both masters and the same counts")
        assert call(f"{base_a}/api/tasks/{cancelled}").json()["state"] == "cancelled"
        assert call(f"{base_a}/api/tasks/{kept}").json()["state"] == "pending"


def test_with_tls_the_dashboard_serves_https_with_the_masters_certificate(
    start_master: StartMaster,
    pki: Pki,  # noqa: F811 - the fixture imported above
) -> None:
    master, base = dashboard_master(start_master, *tls_flags(pki), client_auth={"tls_ca": pki.ca})
    secure = base.replace("http://", "https://")
    context = ssl.create_default_context(cafile=pki.ca)
    with urllib.request.urlopen(f"{secure}/api/overview", context=context, timeout=10) as answer:
        assert json.loads(answer.read())["masters"][0]["listen"] == master.address
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"{base}/api/overview", timeout=10)


def _loaded_aiohttp(pid: int) -> bool:
    """Whether process ``pid`` has aiohttp's compiled modules mapped (loaded)."""
    return "/aiohttp/" in Path(f"/proc/{pid}/maps").read_text()


def test_only_a_master_serving_the_dashboard_loads_its_http_server(
    start_master: StartMaster,
) -> None:
    # Given a master serving its dashboard and one without
    with_dashboard, _ = dashboard_master(start_master)
    plain = start_master()

    # Then only the first loaded aiohttp (most of the master's import time, which
    # every start would otherwise pay)
    assert _loaded_aiohttp(with_dashboard.pid)
    assert not _loaded_aiohttp(plain.pid)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--http-listen", "0.0.0.0:8080"], "--http-listen: 0.0.0.0:8080 is reachable"),
        (["--http-listen", "127.0.0.1:50051"], "is the gRPC --listen address"),
        (["--dashboard-read-token", "r"], "--dashboard-read-token: needs --token"),
        (["--token", "t", "--dashboard-read-token", "t"], "must differ from --token"),
    ],
)
def test_unsafe_dashboard_settings_are_refused(argv: list[str], message: str) -> None:
    args = build_parser().parse_args(["master", *argv])
    with pytest.raises(ConfigError, match=message):
        master_config(args)


def test_a_non_loopback_dashboard_is_allowed_with_a_token() -> None:
    args = build_parser().parse_args(["master", "--http-listen", "0.0.0.0:8080", "--token", "t"])
    assert master_config(args).http_listen == "0.0.0.0:8080"
