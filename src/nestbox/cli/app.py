"""The `nestbox` commands (Click). Each talks to the API through `nestbox.sdk`; settings come
from `--api-url`/`--api-key`, then `NESTBOX_API_URL`/`NESTBOX_API_KEY`, then the config file
`nestbox login` writes. Exit codes: 0 done, 1 an API or connection error (one red line with
the API's code and message), 2 a usage error; `exec` and `shell` exit with the command's code.
"""

from __future__ import annotations

import functools
import getpass
import os
import sys
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import click

from nestbox import __version__
from nestbox.cli import copy as cp
from nestbox.cli import output
from nestbox.protocol.metadata import SYSTEM_KEYS
from nestbox.sdk import Nestbox, NestboxError
from nestbox.sdk.config import resolve, write_config

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from nestbox.sdk.models import BuildEvent, CapsuleView

F = TypeVar("F", bound="Callable[..., Any]")

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Settings:
    def __init__(self, api_url: str | None, api_key: str | None) -> None:
        self.api_url = api_url
        self.api_key = api_key

    def client(self) -> Nestbox:
        return Nestbox(self.api_url, self.api_key)


def api_errors(fn: F) -> F:
    """An SDK error becomes one red line and exit code 1."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NestboxError as err:
            output.error(err.code, err.message)
            sys.exit(1)

    return run  # type: ignore[return-value]


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="JSON for scripts")(fn)


def pairs(values: Sequence[str], what: str) -> dict[str, str]:
    """`K=V` options as a dict. :raise click.BadParameter:"""
    found = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint=what)
        found[key] = item
    return found


@click.group(context_settings=CONTEXT)
@click.option("--api-url", envvar="NESTBOX_API_URL", help="the control plane's URL")
@click.option("--api-key", envvar="NESTBOX_API_KEY", help="an API key (wrn_…)")
@click.version_option(__version__, prog_name="nestbox")
@click.pass_context
def cli(ctx: click.Context, api_url: str | None, api_key: str | None) -> None:
    """Nestbox: microVM sandboxes ("capsules") from the command line.

    Shell completion: eval "$(nestbox completion bash)" (or zsh, fish)."""
    ctx.obj = Settings(api_url, api_key)


pass_settings = click.make_pass_decorator(Settings)


# ── login, completion ──


@cli.command()
@click.option("--url", help="the control plane's URL (default: the current one)")
@click.option("--key", help="the API key (asked for when not given)")
@pass_settings
@api_errors
def login(settings: Settings, url: str | None, key: str | None) -> None:
    """Check an API key and store it with the URL in the config file (mode 0600)."""
    current = resolve(settings.api_url, settings.api_key)
    url = url or settings.api_url or current.api_url
    key = key or settings.api_key or getpass.getpass("API key: ").strip()
    with Nestbox(url, key) as nb:
        me = nb.me()
    path = write_config({"api_url": url, "api_key": key})
    output.out.print(f"Logged in to {url} as {me.email} (team {me.team_id}); saved in {path}")


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]), default="bash")
def completion(shell: str) -> None:
    """Print the shell completion script: eval "$(nestbox completion bash)"."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    complete = cls(cli, {}, "nestbox", "_NESTBOX_COMPLETE")
    sys.stdout.write(complete.source())


# ── capsules ──


@cli.group()
def capsule() -> None:
    """Create, list, inspect, pause, resume and remove capsules."""


def _capsule_rows(capsules: Sequence[CapsuleView]) -> None:
    output.table(
        ["ID", "STATUS", "TEMPLATE", "VCPUS", "MEMORY", "CREATED", "METADATA"],
        [(c.id, c.status, c.template, c.vcpus, f"{c.memory_mb} MiB", c.created_at,
          {k: v for k, v in c.metadata.items() if k not in SYSTEM_KEYS}) for c in capsules],
    )  # fmt: skip


def _capsule_info(c: CapsuleView) -> None:
    output.fields([
        ("id", c.id), ("status", c.status), ("template", c.template), ("vcpus", c.vcpus),
        ("memory", f"{c.memory_mb} MiB"), ("disk", f"{c.disk_size_mb} MiB"),
        ("idle timeout", f"{c.timeout_sec} s" if c.timeout_sec else "never"),
        ("internet", "yes" if c.allow_internet_access else "no"), ("host", c.host_id),
        ("created", c.created_at), ("started", c.started_at), ("last active", c.last_active_at),
        ("metadata", c.metadata),
    ])  # fmt: skip


@capsule.command("create")
@click.option("-t", "--template", help="the template (default: the server's, minimal)")
@click.option("--vcpus", type=click.IntRange(1, 64))
@click.option("--memory", "memory_mb", type=click.IntRange(128), help="MiB")
@click.option("--idle-timeout", type=click.IntRange(0), help="seconds idle before a pause; 0 never")
@click.option("--lifetime", type=click.IntRange(0), help="seconds each run may last")
@click.option("-m", "--metadata", multiple=True, help="KEY=VALUE (repeatable)")
@click.option("--internet/--no-internet", default=None, help="outbound network access")
@json_option
@pass_settings
@api_errors
def capsule_create(settings: Settings, template: str | None, vcpus: int | None,
                   memory_mb: int | None, idle_timeout: int | None, lifetime: int | None,
                   metadata: Sequence[str], internet: bool | None,
                   as_json: bool) -> None:  # fmt: skip
    """Create a capsule and print its id once it runs."""
    with settings.client() as nb:
        made = nb.capsules.create(
            template, vcpus=vcpus, memory_mb=memory_mb, idle_timeout=idle_timeout,
            lifetime=lifetime, metadata=pairs(metadata, "--metadata") or None,
            internet=internet,
        )  # fmt: skip
    if as_json:
        output.as_json(made.info)
    else:
        output.out.print(made.id)


@capsule.command("list")
@click.option("-s", "--status", multiple=True, help="only these statuses (repeatable)")
@click.option("-m", "--metadata", multiple=True, help="KEY=VALUE that must match (repeatable)")
@json_option
@pass_settings
@api_errors
def capsule_list(settings: Settings, status: Sequence[str], metadata: Sequence[str],
                 as_json: bool) -> None:  # fmt: skip
    """Your team's capsules."""
    with settings.client() as nb:
        found = list(nb.capsules.list(status=list(status) or None,
                                      metadata=pairs(metadata, "--metadata") or None))  # fmt: skip
    if as_json:
        output.as_json(found)
    else:
        _capsule_rows(found)


@capsule.command("info")
@click.argument("capsule_id")
@json_option
@pass_settings
@api_errors
def capsule_info(settings: Settings, capsule_id: str, as_json: bool) -> None:
    """One capsule's details."""
    with settings.client() as nb:
        info = nb.capsules.info(capsule_id)
    if as_json:
        output.as_json(info)
    else:
        _capsule_info(info)


@capsule.command("pause")
@click.argument("capsule_ids", nargs=-1, required=True)
@json_option
@pass_settings
@api_errors
def capsule_pause(settings: Settings, capsule_ids: Sequence[str], as_json: bool) -> None:
    """Pause running capsules (memory and disk kept; resume in well under a second)."""
    with settings.client() as nb:
        done = [nb.capsules.pause(c) for c in capsule_ids]
    _report(done, as_json)


@capsule.command("resume")
@click.argument("capsule_ids", nargs=-1, required=True)
@json_option
@pass_settings
@api_errors
def capsule_resume(settings: Settings, capsule_ids: Sequence[str], as_json: bool) -> None:
    """Resume paused capsules."""
    with settings.client() as nb:
        done = [nb.capsules.resume(c) for c in capsule_ids]
    _report(done, as_json)


def _report(done: Sequence[CapsuleView], as_json: bool) -> None:
    if as_json:
        output.as_json(done)
    else:
        for c in done:
            output.out.print(f"{c.id} {c.status}")


@capsule.command("rm")
@click.argument("capsule_ids", nargs=-1, required=True)
@pass_settings
@api_errors
def capsule_rm(settings: Settings, capsule_ids: Sequence[str]) -> None:
    """Destroy capsules (their disk and memory are gone)."""
    with settings.client() as nb:
        for capsule_id in capsule_ids:
            nb.capsules.destroy(capsule_id)
            output.out.print(capsule_id)


@capsule.command("timeout")
@click.argument("capsule_id")
@click.argument("seconds", type=click.IntRange(0))
@json_option
@pass_settings
@api_errors
def capsule_timeout(settings: Settings, capsule_id: str, seconds: int, as_json: bool) -> None:
    """Set a capsule's idle timeout (0: never pause it)."""
    with settings.client() as nb:
        info = nb.capsules.set_timeout(capsule_id, seconds)
    _report([info], as_json)


# ── commands and terminals ──


@cli.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("capsule_id")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("-e", "--env", multiple=True, help="KEY=VALUE (repeatable)")
@click.option("-w", "--cwd", help="working directory")
@click.option("-u", "--user", help="guest user")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), help="seconds; then killed")
@pass_settings
@api_errors
def exec_command(settings: Settings, capsule_id: str, argv: Sequence[str], env: Sequence[str],
                 cwd: str | None, user: str | None, timeout: float | None) -> None:  # fmt: skip
    """Run a command in a capsule: `nestbox exec CAPSULE -- cmd args…`. Output streams as it
    comes; the exit code is the command's."""
    with settings.client() as nb:
        capsule = nb.capsules.get(capsule_id)
        handle = capsule.commands.start(list(argv), envs=pairs(env, "--env") or None, cwd=cwd,
                                        user=user)  # fmt: skip
        with handle:
            try:
                handle.wait(on_stdout=_stream(sys.stdout), on_stderr=_stream(sys.stderr),
                            timeout=timeout, kill_on_timeout=True)  # fmt: skip
            except KeyboardInterrupt:
                handle.kill()
                sys.exit(130)
    sys.exit(handle.exit_code if handle.exit_code is not None else 1)


def _stream(f: Any) -> Callable[[str], None]:
    def write(data: str) -> None:
        f.write(data)
        f.flush()

    return write


@cli.command()
@click.argument("capsule_id")
@click.option("-c", "--cmd", default="/bin/bash", show_default=True, help="what to run")
@click.option("-u", "--user", help="guest user")
@pass_settings
@api_errors
def shell(settings: Settings, capsule_id: str, cmd: str, user: str | None) -> None:
    """An interactive terminal in a capsule (Ctrl-C goes to the capsule; exit the shell to
    leave). Exits with the shell's code."""
    from nestbox.cli.shell import run_shell

    if not os.isatty(sys.stdin.fileno()):
        raise click.UsageError("shell needs a terminal on stdin (use exec for scripts)")
    code = anyio.run(run_shell, settings.api_url, settings.api_key, capsule_id, cmd, user)
    sys.exit(code if code >= 0 else 1)


# ── files ──


@cli.command("cp")
@click.argument("src")
@click.argument("dst")
@pass_settings
@api_errors
def cp_command(settings: Settings, src: str, dst: str) -> None:
    """Copy files or directories between here and a capsule: `cp ./dir CAPSULE:/root/`,
    `cp CAPSULE:/var/log ./logs`."""
    with settings.client() as nb:
        count = cp.copy(nb, cp.parse(src), cp.parse(dst))
    output.note(f"{count} file{'s' if count != 1 else ''} copied")


@cli.command("ls")
@click.argument("capsule_id")
@click.argument("path", default="/")
@json_option
@pass_settings
@api_errors
def ls_command(settings: Settings, capsule_id: str, path: str, as_json: bool) -> None:
    """List a directory in a capsule (`ls CAPSULE /path`, or `ls CAPSULE:/path`)."""
    spec = cp.parse(capsule_id)
    if spec.capsule is not None:
        capsule_id, path = spec.capsule, spec.path
    with settings.client() as nb:
        entries = nb.capsules.get(capsule_id).files.list(path)
    if as_json:
        output.as_json(entries)
        return
    output.table(
        ["MODE", "OWNER", "SIZE", "MODIFIED", "NAME"],
        [(e.permissions, e.owner, output.size(e.size), _unix(e.modified_at),
          e.name + ("/" if e.type == "directory" else "")) for e in entries],
    )  # fmt: skip


def _unix(seconds: int) -> str:
    from datetime import UTC, datetime

    return output.cell(datetime.fromtimestamp(seconds, UTC))


# ── templates ──


@cli.group()
def template() -> None:
    """List, remove and build templates."""


@template.command("list")
@click.option("--type", "kind", type=click.Choice(["base", "snapshot"]))
@json_option
@pass_settings
@api_errors
def template_list(settings: Settings, kind: str | None, as_json: bool) -> None:
    """Your team's and the platform's templates."""
    with settings.client() as nb:
        found = nb.templates.list(type=kind)
    if as_json:
        output.as_json(found)
        return
    output.table(
        ["NAME", "TYPE", "VCPUS", "MEMORY", "SIZE", "CREATED", "PLATFORM"],
        [(t.name, t.type, t.vcpus, f"{t.memory_mb} MiB" if t.memory_mb else None,
          output.size(t.size_bytes), t.created_at, "yes" if t.platform else "")
         for t in found],
    )  # fmt: skip


@template.command("rm")
@click.argument("names", nargs=-1, required=True)
@pass_settings
@api_errors
def template_rm(settings: Settings, names: Sequence[str]) -> None:
    """Delete templates."""
    with settings.client() as nb:
        for name in names:
            nb.templates.delete(name)
            output.out.print(name)


@template.command("build")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("directory", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("-n", "--name", help="the template's name (default: the recipe file's stem)")
@click.option("--base", "base_template", help="the template to build on (or FROM in the recipe)")
@click.option("--vcpus", type=click.IntRange(1, 64))
@click.option("--memory", "memory_mb", type=click.IntRange(128), help="MiB")
@click.option("--skip-pre-post", is_flag=True, help="no apt update / user set-up / clean-up")
@json_option
@pass_settings
@api_errors
def template_build(settings: Settings, recipe: str, directory: str | None, name: str | None,
                   base_template: str | None, vcpus: int | None, memory_mb: int | None,
                   skip_pre_post: bool, as_json: bool) -> None:  # fmt: skip
    """Build a template from a recipe file (RUN, COPY, ENV, WORKDIR, USER, START lines; FROM
    and HEALTHCHECK set the base and the healthcheck), with DIRECTORY as COPY's sources.
    Shows each step and its output live; exits 1 unless the build succeeds."""
    from pathlib import Path

    settings_ = {"vcpus": vcpus, "memory_mb": memory_mb, "skip_pre_post": skip_pre_post}
    extra = {k: v for k, v in settings_.items() if v}
    with settings.client() as nb:
        build = nb.builds.create(
            name or Path(recipe).stem, recipe, directory, base_template=base_template,
            extra=extra, on_event=None if as_json else _show_build_event,
        )  # fmt: skip
    if as_json:
        output.as_json(build)
    else:
        line = f"build {build.id}: {build.status}"
        output.out.print(line + (f": {build.error}" if build.error else ""))
    if build.status != "success":
        sys.exit(1)


def _show_build_event(event: BuildEvent) -> None:
    kind = event.type
    if kind == "step_start":
        output.out.print(f"[bold]step {event.step}[/] [dim]{event.phase}[/] {event.cmd}")
    elif kind == "output":
        style = "red" if event.stream == "stderr" else ""
        text = (event.line or "").rstrip("\n").replace("[", r"\[")
        output.out.print(f"  [{style}]{text}[/]" if style else f"  {text}")
    elif kind == "step_end":
        mark = "[green]ok[/]" if event.ok else f"[red]failed (exit {event.exit})[/]"
        output.out.print(f"  {mark} [dim]{event.elapsed_ms} ms[/]")
    elif kind == "healthcheck":
        output.out.print(f"[dim]healthcheck: {'ok' if event.ok else 'not yet'}[/]")


# ── events, keys ──


@cli.command()
@json_option
@pass_settings
@api_errors
def events(settings: Settings, as_json: bool) -> None:
    """Follow your team's events (Ctrl-C to stop)."""
    with settings.client() as nb:
        try:
            for event in nb.events():
                if as_json:
                    sys.stdout.write(event.model_dump_json() + "\n")
                    sys.stdout.flush()
                    continue
                what = event.resource.id if event.resource else ""
                outcome = f" {event.outcome}" if event.outcome else ""
                output.out.print(f"{output.cell(event.timestamp)} {event.event}{outcome} {what}")
        except KeyboardInterrupt:
            return


@cli.group(invoke_without_command=True)
@click.pass_context
def keys(ctx: click.Context) -> None:
    """Your team's API keys (lists them without a subcommand)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(keys_list)


@keys.command("list")
@json_option
@pass_settings
@api_errors
def keys_list(settings: Settings, as_json: bool = False) -> None:
    """List the team's API keys."""
    with settings.client() as nb:
        found = nb.keys.list()
    if as_json:
        output.as_json(found)
        return
    rows = [(k.id, k.name, k.key_prefix, k.created_at, k.last_used) for k in found]
    output.table(["ID", "NAME", "PREFIX", "CREATED", "LAST USED"], rows)


@keys.command("create")
@click.argument("name")
@json_option
@pass_settings
@api_errors
def keys_create(settings: Settings, name: str, as_json: bool) -> None:
    """Create a key; the key itself is shown this once."""
    with settings.client() as nb:
        made = nb.keys.create(name)
    if as_json:
        output.as_json(made)
    else:
        output.out.print(made.key or "")


@keys.command("rm")
@click.argument("key_ids", nargs=-1, required=True)
@pass_settings
@api_errors
def keys_rm(settings: Settings, key_ids: Sequence[str]) -> None:
    """Revoke keys."""
    with settings.client() as nb:
        for key_id in key_ids:
            nb.keys.delete(key_id)
            output.out.print(key_id)


def main() -> None:
    cli(prog_name="nestbox")


__all__ = ["cli", "main"]
