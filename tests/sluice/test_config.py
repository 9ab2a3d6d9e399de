"""Settings: the .env file, `sluice config`, `sluice --version`, and errors that never show a
secret. The command runs as a real subprocess, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sluice import __version__
from sluice.config import KafkaSettings, Schemas, find_home, settings_markdown
from sluice.stack import StackState, write_state
from sluice.streams.topics import Topic, Topics

ROOT = Path(__file__).resolve().parents[2]
SECRET = "correct-horse-battery-staple"


def sluice(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    clean["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "sluice", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_readme_lists_every_setting_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- settings:start")
    table = readme[readme.index("\n", start) + 1 : readme.index("<!-- settings:end -->")]
    assert table == settings_markdown(), "run `sluice config --markdown` and paste it in README"
    for name in ("SLUICE_KAFKA_REPLICATION", "SLUICE_DATABASE_POOL_MAX", "SLUICE_PRUNE_INTERVAL"):
        assert f"| `{name}` |" in table


def test_version(tmp_path: Path) -> None:
    done = sluice("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.strip() == f"sluice, version {__version__}"


def test_config_reads_the_env_file_masks_secrets_and_the_environment_wins(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        f"SLUICE_KAFKA_SASL_PASSWORD={SECRET}\n"
        "SLUICE_KAFKA_PARTITIONS=6\n"
        f"SLUICE_DATABASE_URL=postgresql://loader:{SECRET}@db.internal:5432/sluice\n"
        "SLUICE_TOPIC_PREFIX=from-file\n"
    )
    done = sluice("config", cwd=tmp_path, env={"SLUICE_TOPIC_PREFIX": "from-env"})
    assert done.returncode == 0, done.stderr
    lines = set(done.stdout.splitlines())
    assert "SLUICE_KAFKA_PARTITIONS=6" in lines
    assert "SLUICE_KAFKA_SASL_PASSWORD=**********" in lines
    assert "SLUICE_DATABASE_URL=postgresql://loader:**********@db.internal:5432/sluice" in lines
    assert "SLUICE_TOPIC_PREFIX=from-env" in lines
    assert SECRET not in done.stdout + done.stderr


def test_config_names_another_env_file(tmp_path: Path) -> None:
    other = tmp_path / "prod.env"
    other.write_text("SLUICE_GROUP_ID=prod-workers\n")
    done = sluice("config", "--json", cwd=tmp_path, env={"SLUICE_ENV_FILE": str(other)})
    assert done.returncode == 0, done.stderr
    assert '"name":"SLUICE_GROUP_ID","value":"prod-workers"' in done.stdout
    missing = sluice("config", cwd=tmp_path, env={"SLUICE_ENV_FILE": str(tmp_path / "no.env")})
    assert missing.returncode == 1
    assert f"SLUICE_ENV_FILE={tmp_path / 'no.env'}: no such file" in missing.stderr


@pytest.mark.parametrize(
    ("env", "said"),
    [
        (
            {"SLUICE_KAFKA_PARTITIONS": "four"},
            "SLUICE_KAFKA_PARTITIONS: Input should be a valid integer",
        ),
        (
            {"SLUICE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "SLUICE_KAFKA_SASL_PASSWORD": SECRET},
            "SLUICE_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs SLUICE_KAFKA_SASL_USERNAME",
        ),
        (
            {"SLUICE_KAFKA_SECURITY_PROTOCOL": "TLS", "SLUICE_KAFKA_SASL_PASSWORD": SECRET},
            "SLUICE_KAFKA_SECURITY_PROTOCOL: Input should be 'PLAINTEXT', 'SSL', "
            "'SASL_PLAINTEXT' or 'SASL_SSL'",
        ),
        ({"SLUICE_DATABASE_SCHEMA": "My-Schema"}, "SLUICE_DATABASE_SCHEMA='My-Schema' is not"),
        ({"SLUICE_TOPIC_PREFIX": "team b"}, "SLUICE_TOPIC_PREFIX='team b' cannot start"),
    ],
)
def test_a_bad_setting_stops_the_command_with_its_name_and_never_the_secret(
    tmp_path: Path, env: dict[str, str], said: str
) -> None:
    done = sluice("config", cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("error: invalid settings: ")
    assert said in done.stderr
    assert SECRET not in done.stderr + done.stdout


def test_names_of_a_deployment() -> None:
    topics = Topics.of(KafkaSettings(topic_prefix="teamb.sluice"))
    assert topics.requests == "teamb.sluice.requests"
    assert topics.logical("teamb.sluice.batches") is Topic.BATCHES
    assert topics.logical("sluice.batches") is None
    assert [s.name for s in Topics().specs(4)][:2] == ["sluice.requests", "sluice.batches"]
    assert {s.partitions for s in Topics().specs(4) if s.name.endswith("deadletter")} == {1}
    with pytest.raises(ValueError, match="must differ"):
        Schemas(core="same", atproto="same")
    with pytest.raises(ValueError, match="not a usable schema name"):
        Schemas(core="drop table x")


def test_the_stack_is_found_from_any_folder_of_the_project(tmp_path: Path) -> None:
    """Without SLUICE_HOME, the nearest .sluice folder upward is the home (as git finds .git),
    so `sluice env` in a subfolder finds the stack started at the project's top."""
    project = tmp_path / "project"
    deeper = project / "data" / "2026"
    deeper.mkdir(parents=True)
    assert find_home(deeper) == Path(".sluice")  # none yet: ./.sluice, as before
    state = StackState(
        kafka_bootstrap="127.0.0.1:19092",
        database_url="postgresql://h:5/d",
        pids={"supervisor": os.getpid()},  # a live "supervisor": the state is not stale
    )
    write_state(project / ".sluice", state)
    assert find_home(deeper) == (project / ".sluice").resolve()
    shown = sluice("env", cwd=deeper)
    assert shown.returncode == 0, shown.stderr
    assert "SLUICE_KAFKA_BOOTSTRAP=127.0.0.1:19092" in shown.stdout
    elsewhere = sluice("env", cwd=tmp_path)  # above the project: no stack
    assert elsewhere.returncode != 0 and "no Sluice stack is running" in elsewhere.stderr


def test_every_command_shows_an_example_in_its_help() -> None:
    """`sluice X --help` ends with a command to copy, for every command and subcommand."""
    import click
    from click.testing import CliRunner

    from sluice.cli import cli

    def commands(group: click.Group, prefix: list[str]) -> list[list[str]]:
        out = []
        for name, command in sorted(group.commands.items()):
            out.append([*prefix, name])
            if isinstance(command, click.Group):
                out += commands(command, [*prefix, name])
        return out

    runner = CliRunner()
    missing = []
    for path in commands(cli, []):
        shown = runner.invoke(cli, [*path, "--help"])
        assert shown.exit_code == 0, (path, shown.output)
        if "Example" not in shown.output or f"sluice {path[0]}" not in shown.output:
            missing.append(" ".join(path))
    assert missing == []
