"""What only the PostgreSQL store has: its URL, its schema versions and its errors.
The Store contract itself runs on it in test_store_contract.py and its siblings."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import psycopg
import pytest

from taskfleet.common.errors import ConfigError
from taskfleet.common.model import TaskSpec
from taskfleet.master.store import Store, open_store
from taskfleet.master.store.postgres import SCHEMA_VERSION, PostgresStore, redacted

import pg

PASSWORD = "s3cret-Pa55"


def with_password(url: str, password: str = PASSWORD) -> str:
    scheme, _, rest = url.partition("://")
    user, _, where = rest.partition("@")
    return f"{scheme}://{user}:{password}@{where}"


def test_open_store_understands_both_postgres_schemes(tmp_path: Path) -> None:
    with pg.database() as url:
        for scheme in ("postgresql", "postgres"):
            store = open_store(scheme + url.removeprefix("postgresql"))
            assert isinstance(store, PostgresStore)
            store.close()


def test_a_database_that_cannot_be_reached_is_a_config_error_without_the_password() -> None:
    admin = pg.admin_dsn()
    base, _, _ = admin.rpartition("/")
    url = with_password(f"{base}/no_such_database")

    with pytest.raises(ConfigError) as raised:
        open_store(url)

    message = str(raised.value)
    assert PASSWORD not in message
    assert "no_such_database" in message
    assert "does not exist" in message


def test_redacted_drops_the_password_in_either_form() -> None:
    url = "postgresql://tf:" + PASSWORD + "@db.example:5433/tasks"
    keywords = f"host=db.example port=5433 dbname=tasks user=tf password={PASSWORD}"

    assert redacted(url) == "postgresql://tf@db.example:5433/tasks"
    assert redacted(keywords) == "postgresql://tf@db.example:5433/tasks"
    assert PASSWORD not in redacted(url + "?sslmode=bogus&password=" + PASSWORD)


def test_without_psycopg_open_store_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now fails
    monkeypatch.delitem(sys.modules, "taskfleet.master.store.postgres")

    with pytest.raises(ConfigError) as raised:
        open_store(with_password("postgresql://tf@127.0.0.1/tasks"))

    message = str(raised.value)
    assert "pip install 'taskfleet[postgres]'" in message
    assert "\n" not in message
    assert PASSWORD not in message


def test_a_database_of_a_newer_schema_is_refused_naming_both_versions() -> None:
    with pg.database() as url:
        open_store(url).close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE taskfleet_schema SET version = %s", (SCHEMA_VERSION + 1,))

        with pytest.raises(ConfigError) as raised:
            open_store(url)

    message = str(raised.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert f"versions up to {SCHEMA_VERSION}" in message


def test_masters_opening_a_new_database_together_migrate_it_once() -> None:
    opened: list[Store] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one(url: str) -> None:
        start.wait(timeout=30)
        try:
            opened.append(open_store(url))
        except BaseException as exc:
            errors.append(exc)

    with pg.database() as url:
        threads = [threading.Thread(target=open_one, args=(url,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        try:
            assert errors == []
            assert len(opened) == 4
            [task_id] = opened[0].submit([TaskSpec(name="add", queue="q")], 1.0)
            assert opened[3].get(task_id).id == task_id
        finally:
            for store in opened:
                store.close()
