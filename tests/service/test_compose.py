"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

1. The file is valid: `docker-compose config` (Debian's docker-compose package) when installed, the
   Compose specification's JSON schema that package ships when present, and always a focused schema
   of our own for the keys this file uses (typos in service keys, depends_on conditions, durations).
2. Everything it runs exists in the code: each `icd ...` command line parses with the real click
   command, and each ICD_* variable is a Settings field.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from icd_cli.main import main
from store.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
# Where Debian's docker-compose package keeps the Compose specification schema.
SPEC_SCHEMAS = [Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")]

DURATION = {"type": "string", "pattern": r"^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$"}
STR_LIST = {"type": "array", "items": {"type": "string"}}
HEALTHCHECK = {
    "type": "object",
    "additionalProperties": False,
    "required": ["test"],
    "properties": {
        "test": {
            "oneOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "minItems": 2,
                    "items": {"type": "string"},
                    "prefixItems": [{"enum": ["CMD", "CMD-SHELL", "NONE"]}],
                },
            ]
        },
        "interval": DURATION,
        "timeout": DURATION,
        "start_period": DURATION,
        "retries": {"type": "integer", "minimum": 1},
    },
}
SERVICE = {
    "type": "object",
    "additionalProperties": False,
    "anyOf": [{"required": ["image"]}, {"required": ["build"]}],
    "properties": {
        "image": {"type": "string"},
        "build": {"oneOf": [{"type": "string"}, {"type": "object"}]},
        "command": {"oneOf": [{"type": "string"}, STR_LIST]},
        "environment": {
            "oneOf": [
                {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean", "null"]}},
                STR_LIST,
            ]
        },
        "ports": STR_LIST,
        "volumes": STR_LIST,
        "shm_size": {"type": ["string", "integer"]},
        "stop_grace_period": DURATION,
        "restart": {"enum": ["no", "always", "on-failure", "unless-stopped"]},
        "depends_on": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["condition"],
                "properties": {
                    "condition": {"enum": ["service_started", "service_healthy", "service_completed_successfully"]}
                },
            },
        },
        "healthcheck": HEALTHCHECK,
        "deploy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "resources": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "reservations": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "devices": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["capabilities"],
                                        "properties": {
                                            "driver": {"type": "string"},
                                            "count": {"oneOf": [{"type": "integer", "minimum": 1}, {"const": "all"}]},
                                            "device_ids": STR_LIST,
                                            "capabilities": STR_LIST,
                                        },
                                    },
                                }
                            },
                        }
                    },
                }
            },
        },
    },
}
COMPOSE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["services"],
    "patternProperties": {"^x-": {}},
    "properties": {
        "services": {"type": "object", "minProperties": 1, "additionalProperties": SERVICE},
        "volumes": {"type": "object", "additionalProperties": {"type": ["object", "null"]}},
    },
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the x-icd-* anchors and merge keys


def test_the_focused_schema_accepts_the_file(compose: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(COMPOSE_SCHEMA).validate(compose)


def test_the_focused_schema_catches_typos(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_completed"
    broken["services"]["worker"]["helthcheck"] = broken["services"]["worker"].pop("healthcheck")
    errors = list(jsonschema.Draft202012Validator(COMPOSE_SCHEMA).iter_errors(broken))
    assert len(errors) == 2


def test_valid_for_docker_compose() -> None:
    """`docker-compose config` parses and validates the file like `docker compose up` would."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose); the schema tests still ran")
    out = subprocess.run(
        [exe, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert out.returncode == 0, out.stderr


def test_valid_against_the_compose_specification_schema(compose: dict[str, Any]) -> None:
    schema_path = next((p for p in SPEC_SCHEMAS if p.is_file()), None)
    if schema_path is None:
        pytest.skip("the Compose specification schema is not installed (Debian package docker-compose)")
    schema = json.loads(schema_path.read_text())
    # Its "$schema" is written with a trailing '#' that jsonschema does not recognise: name the draft.
    jsonschema.Draft201909Validator(schema).validate(compose)


def test_services_roles_and_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    for name in ("postgres", "redis", "api", "worker"):
        assert "healthcheck" in services[name], f"{name} needs a healthcheck"
    assert services["migrate"]["command"] == ["icd", "db", "upgrade"]
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices and "gpu" in devices[0]["capabilities"]
    # The API serves the checkpoints the worker writes: both mount the same artifact volume.
    assert set(services["api"]["volumes"]) & set(services["worker"]["volumes"])


def _command_lines(compose: dict[str, Any]) -> list[list[str]]:
    """Every argv the file (and the Dockerfile's CMD) runs, from commands and healthchecks."""
    lines = []
    for svc in compose["services"].values():
        cmd = svc.get("command")
        if cmd:
            lines.append(cmd if isinstance(cmd, list) else cmd.split())
        test = svc.get("healthcheck", {}).get("test")
        if isinstance(test, list) and test[0] == "CMD":
            lines.append(test[1:])
        elif isinstance(test, list) and test[0] == "CMD-SHELL":
            lines.append(test[1].split())
    m = re.search(r"^CMD\s+(\[.*\])\s*$", DOCKERFILE.read_text(), re.MULTILINE)
    assert m, "Dockerfile has no exec-form CMD"
    lines.append(json.loads(m.group(1)))
    return lines


def _resolve(args: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """(leaf command, its path, its remaining args) for an `icd` argv."""
    cmd: click.Command = main
    path: list[str] = []
    rest = list(args)
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        ctx = click.Context(cmd)
        sub = cmd.get_command(ctx, rest[0])
        assert sub is not None, f"`icd {' '.join(path + rest[:1])}` does not exist"
        cmd, path, rest = sub, [*path, rest[0]], rest[1:]
    return cmd, path, rest


def test_every_icd_command_exists_and_parses(compose: dict[str, Any]) -> None:
    icd_lines = [line[1:] for line in _command_lines(compose) if line[0] == "icd"]
    assert len(icd_lines) >= 4  # migrate, api, worker, worker healthcheck (+ Dockerfile CMD)
    for args in icd_lines:
        cmd, path, rest = _resolve(args)
        assert not isinstance(cmd, click.Group), f"`icd {' '.join(args)}` names a group, not a command"
        # Parsing (not running) checks every option and value against the real command.
        cmd.make_context(" ".join(["icd", *path]), list(rest))
        help_out = CliRunner().invoke(main, [*path, "--help"])
        assert help_out.exit_code == 0, help_out.output


def test_a_misspelled_option_would_be_caught() -> None:
    cmd, path, rest = _resolve(["serve", "--no-workers"])
    with pytest.raises(click.NoSuchOption):
        cmd.make_context("icd serve", rest)


def _icd_env_names(compose: dict[str, Any]) -> set[str]:
    names = set()
    for svc in compose["services"].values():
        env = svc.get("environment") or {}
        keys = env.keys() if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        names |= {k for k in keys if k.startswith("ICD_")}
    names |= set(re.findall(r"\b(ICD_[A-Z_]+)=", DOCKERFILE.read_text()))
    return names


def test_every_icd_variable_is_a_setting(compose: dict[str, Any]) -> None:
    names = _icd_env_names(compose)
    assert {"ICD_DATABASE_URL", "ICD_BROKER_URL", "ICD_ARTIFACT_ROOT"} <= names
    fields = {f"ICD_{f.upper()}" for f in Settings.model_fields}
    assert names <= fields, f"not Settings fields: {sorted(names - fields)}"


def test_the_compose_environment_gives_production_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith("ICD_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("ICD_API_TOKEN", raising=False)
    for key, value in compose["services"]["worker"]["environment"].items():
        # Compose's ${VAR:-default} interpolation, with VAR unset.
        monkeypatch.setenv(key, re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)))
    s = Settings()
    assert s.database_url.startswith("postgresql+psycopg://") and s.broker_url.startswith("redis://")
    assert s.artifact_root == Path("/data/artifacts") and s.data_roots == [Path("/datasets")]
    assert not s.api_token_required  # ICD_API_TOKEN defaults to empty: no token
