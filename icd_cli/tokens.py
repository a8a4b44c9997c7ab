"""`icd token create|list|revoke|set-quota`: named API tokens, stored as the sha256 of their secret in the database.

Run it where ICD_DATABASE_URL points at the service's database (on the embedded default, the SQLite
file under ICD_HOME is created and migrated first). A secret is printed once, at creation.
"""

from __future__ import annotations

from typing import Any

import click


@click.group("token")
def token() -> None:
    """Named API tokens (stored hashed in ICD_DATABASE_URL); each job records the token that submitted it."""


def _token_session() -> Any:
    """A session on the configured database, migrated if this is the embedded SQLite default."""
    from store.db import make_engine, session_factory, upgrade_database
    from store.settings import Settings

    settings = Settings()  # from the environment as it is now
    if settings.database_url.startswith("sqlite"):
        settings.ensure_dirs()
        upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    return engine, session_factory(engine)()


def _limit(_ctx: Any, _param: Any, value: str | None) -> int | None:
    """A quota value: a number, or `none` for no limit."""
    if value is None or value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: a whole number, or none for no limit") from None


def quota_options(fn: Any) -> Any:
    """--max-running, --max-gpus and --max-priority (docs/scheduling.md)."""
    for name, what in reversed(
        (
            ("--max-running", "Jobs it may run at once; more stay queued (never refused). none: no limit."),
            ("--max-gpus", "Devices (resources.gpus summed) its running jobs may hold. none: no limit."),
            ("--max-priority", "Highest priority it may give its jobs (non-admins; default 0)."),
        )
    ):
        fn = click.option(name, default=None, callback=_limit, metavar="N|none", help=what)(fn)
    return fn


@token.command("create")
@click.option("--name", required=True, help="Who holds it; recorded as the owner of the jobs it submits.")
@click.option("--admin", is_flag=True, help="Sees and manages every owner's jobs.")
@click.option(
    "--takes-over-jobs",
    is_flag=True,
    help="Reuse a revoked token's name: the new token sees and manages the jobs that name owns.",
)
@quota_options
def token_create(
    name: str,
    admin: bool,
    takes_over_jobs: bool,
    max_running: int | None,
    max_gpus: int | None,
    max_priority: int | None,
) -> None:
    """Create a token and print its secret (shown once: only its sha256 is stored)."""
    from store.tokens import Quota, TokenError, create_token

    engine, s = _token_session()
    try:
        quota = Quota(max_running, max_gpus, max_priority)
        _, secret = create_token(s, name, admin=admin, takes_over_jobs=takes_over_jobs, quota=quota)
    except TokenError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        s.close()
        engine.dispose()
    click.echo(secret)
    click.echo(
        f"token {name!r}{' (admin)' if admin else ''} created; send it as 'Authorization: Bearer <token>'. "
        "It is not shown again.",
        err=True,
    )


@token.command("set-quota")
@click.argument("name")
@quota_options
def token_set_quota(name: str, max_running: int | None, max_gpus: int | None, max_priority: int | None) -> None:
    """Replace a token's quotas (an option left out, or none, means no limit). Running jobs keep running;
    queued ones start as the new limits allow."""
    from store.tokens import Quota, TokenError, set_quota

    engine, s = _token_session()
    try:
        set_quota(s, name, Quota(max_running, max_gpus, max_priority))
    except TokenError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        s.close()
        engine.dispose()
    click.echo(f"token {name!r}: {_quota_text(max_running, max_gpus, max_priority)}")


def _quota_text(max_running: int | None, max_gpus: int | None, max_priority: int | None) -> str:
    def show(v: int | None) -> str:
        return "-" if v is None else str(v)

    return f"max_running={show(max_running)} max_gpus={show(max_gpus)} max_priority={show(max_priority)}"


@token.command("list")
def token_list() -> None:
    """Names, roles, quotas and creation times (never the secrets)."""
    from store.tokens import list_tokens

    engine, s = _token_session()
    try:
        rows = [
            (
                t.name,
                "admin" if t.admin else "user",
                _quota_text(t.max_running, t.max_gpus, t.max_priority),
                t.created_at.isoformat(timespec="seconds"),
            )
            for t in list_tokens(s)
        ]
    finally:
        s.close()
        engine.dispose()
    if not rows:
        click.echo("no tokens (create one with `icd token create --name <you> [--admin]`)", err=True)
    for row in rows:
        click.echo("\t".join(row))


@token.command("revoke")
@click.argument("name")
def token_revoke(name: str) -> None:
    """Revoke a token at once; its jobs keep its name as their owner."""
    from store.tokens import TokenError, revoke_token

    engine, s = _token_session()
    try:
        revoke_token(s, name)
    except TokenError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        s.close()
        engine.dispose()
    click.echo(f"token {name!r} revoked")
