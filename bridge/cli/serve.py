"""``pdl1 serve``: the HTTP service the QuPath scripts call."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bridge.cli.common import check_device, check_runtime_word, console, fail, pipeline_config
from bridge.options import option_setting
from inference import Pdl1Error


def serve(
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but loopback needs a --token of at least 16 characters.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8765,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="PDL1_TOKEN",
            show_envvar=True,
            help="Shared secret every request must send as 'Authorization: Bearer TOKEN'. On the command line "
            "it shows in `ps`; prefer PDL1_TOKEN or --token-file.",
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            readable=True,
            help="File whose content (surrounding whitespace stripped) is the token; instead of --token.",
        ),
    ] = None,
    allow_root: Annotated[
        list[Path] | None,
        typer.Option(help="Folder whose images may be opened (repeatable; default: the current folder)."),
    ] = None,
    models: Annotated[
        Path | None,
        typer.Option(
            help="Folder with seg/ and nuclei/ (H&E) and nuclei-ihc/ (PD-L1 IHC) model folders, as the shipped "
            "demo's (default: the shipped demo)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", callback=check_device)] = "auto",
    runtime: Annotated[
        str,
        typer.Option(
            help="What runs the models' members, as `pdl1 run --runtime`: torch, openvino (CPU only; the openvino "
            "extra; each model's members are converted at its first job, or read from the cache beside the model; "
            "measured faster on a CPU busy with other work, a little slower on a quiet one) or auto (torch, as "
            "measured: benchmarks/README.md, runtimes).",
            callback=check_runtime_word,
        ),
    ] = "auto",
    keep_results: Annotated[
        int,
        typer.Option(
            min=1,
            help="Results of this many jobs done are held for clients to fetch; older ones are released (failed and "
            "cancelled jobs hold none and do not count).",
        ),
    ] = 16,
    max_queued: Annotated[
        int,
        typer.Option(
            min=1,
            help="Jobs that may wait for the worker, uploads still arriving among them; more are refused with 429 "
            "until one finishes. A queued upload holds its compressed bytes (at most the 64 MiB upload limit).",
        ),
    ] = 16,
) -> None:
    """Start the HTTP service the QuPath scripts call (FastAPI + uvicorn; OpenAPI at /docs)."""
    try:
        import uvicorn  # noqa: F401 - the serve extra's: missing, said now

        from bridge.service import LOOPBACK, ServiceSettings, create_app
        from bridge.service.settings import token_characters_problem
    except ImportError as err:
        raise fail(Pdl1Error(f"the service needs the 'serve' extra: pip install 'pdl1-bridge[serve]' ({err})")) from err
    if token is not None:
        # As --token-file's: "secret\n" (a file read into PDL1_TOKEN) was a token no client could send, and a
        # blank one passed for a token on a public address while every request was refused.
        if not token.strip() and host not in LOOPBACK:
            raise typer.BadParameter(
                "--token (or PDL1_TOKEN) is blank; give the shared secret every request must send, or keep the "
                "default --host 127.0.0.1",
                param_hint="--token",
            )
        token = token.strip() or None
    if token is not None and token_file is not None:
        raise typer.BadParameter(
            "give the token one way: --token (or PDL1_TOKEN) or --token-file, not both", param_hint="--token-file"
        )
    if token_file is not None:
        token = token_file.read_text().strip()
        if not token:
            raise typer.BadParameter(f"{token_file} is empty; write the token into it", param_hint="--token-file")
        warn_if_others_may_read(token_file)
    problem = None if token is None else token_characters_problem(token)
    if problem is not None and token_file is not None:
        raise typer.BadParameter(
            f"{token_file}: {problem}; write only the token into the file, on one line", param_hint="--token-file"
        )
    if problem is not None:
        raise typer.BadParameter(f"{problem}; give --token (or PDL1_TOKEN) such a token", param_hint="--token")
    seg = nuclei = ihc = None
    if models is not None:
        check_models_folder(models)
        seg, nuclei, ihc = models / "seg", models / "nuclei", models / "nuclei-ihc"
    try:
        settings = ServiceSettings(
            host=host,
            port=port,
            token=token,
            allow_roots=tuple(allow_root or (Path.cwd(),)),
            pipeline=pipeline_config(device, seg, nuclei, None, ihc_model=ihc, runtime=runtime),
            keep_results=keep_results,
            max_queued=max_queued,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--host/--token/--allow-root") from err
    from inference import Models, check_runtime

    try:
        # A runtime this machine cannot give (OpenVINO not installed, or asked for on a GPU) stops the start-up,
        # not every job.
        check_runtime(runtime, device, setting=option_setting)
    except (Pdl1Error, ValueError) as err:
        raise fail(err) from err
    check_port_free(host, port)  # before the models load (uvicorn binds after its start-up, then exits 3)

    loaded = Models(settings.pipeline, setting=option_setting)  # a job's runtime advice: --runtime torch
    try:
        # Here rather than in uvicorn's start-up, whose failure prints a traceback before the message.
        loaded.load_he()
    except (Pdl1Error, ValueError) as err:  # ValueError: a --device this machine does not have
        raise fail(err) from err
    console.print(
        f"pdl1 serve on http://{host}:{port} (images under {', '.join(str(r) for r in settings.allow_roots)})"
    )
    from bridge.service.server import run_service

    # Not uvicorn.run: its worker stopped only once every connection had closed, which a stalled client never did.
    run_service(create_app(settings, models=loaded), host=host, port=port)


def check_models_folder(models: Path) -> None:
    """--models names a folder holding the H&E models' folders: a file, or a model folder itself, said only
    "MODELS/seg: no such model folder"."""
    expected = (
        "expected a folder holding seg/ and nuclei/ (H&E) and nuclei-ihc/ (PD-L1 IHC) model folders, as the "
        "shipped demo's"
    )
    if not models.is_dir():
        what = "is a file" if models.exists() else "does not exist"
        raise typer.BadParameter(f"{models} {what}; {expected}", param_hint="--models")
    missing = [name for name in ("seg", "nuclei") if not (models / name).is_dir()]
    if missing:
        itself = " (it is a model folder itself)" if (models / "manifest.json").is_file() else ""
        listed = " and ".join(f"{name}/" for name in missing)
        raise typer.BadParameter(f"{models} holds no {listed}{itself}; {expected}", param_hint="--models")


def check_port_free(host: str, port: int) -> None:
    """Refuse at once an address the service could not bind, as a usage error naming the fix.

    Binds every address ``host`` resolves to as asyncio's server (uvicorn's) will, then lets go:
    SO_REUSEADDR (a port left in TIME_WAIT by a service just stopped is free), IPv6 sockets IPv6-only,
    and an address family this machine has not enabled skipped.
    """
    import errno
    import socket

    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise typer.BadParameter(
            f"{host!r} is no address of this machine ({err.strerror}); give an IP address or a host name that "
            "resolves here, e.g. 127.0.0.1",
            param_hint="--host",
        ) from err
    problem: OSError | None = None
    bound = 0
    for family, kind, proto, _, address in addresses:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:
            continue  # this family is not supported here; asyncio skips it too
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
                bound += 1
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise typer.BadParameter(
                        f"port {port} on {host} is already in use (another pdl1 serve, or another program); "
                        "stop that one or choose a free port with --port (and give the QuPath scripts the same "
                        "port: service.url in pdl1-config.toml)",
                        param_hint="--port",
                    ) from err
                if err.errno != errno.EADDRNOTAVAIL:  # not available: the family is not enabled (asyncio skips it)
                    problem = err
    if problem is not None or not bound:
        reason = problem.strerror if problem is not None else "no address of this machine"
        raise typer.BadParameter(
            f"cannot bind {host} port {port}: {reason}; choose another --port (ports below 1024 need "
            "administrator rights) or a --host of this machine",
            param_hint="--host/--port",
        ) from problem


def warn_if_others_may_read(token_file: Path) -> None:
    """Warn when other users of this machine may read or change the token file: anyone who reads it can use the
    service, also on loopback. A warning, not a refusal: a container's secret is mounted readable by all (0444 or
    0644) with no other user to read it."""
    import os
    import stat

    mode = stat.S_IMODE(os.stat(token_file).st_mode)
    if os.name == "posix" and mode & 0o066:
        who = "its group and others" if mode & 0o060 and mode & 0o006 else "others" if mode & 0o006 else "its group"
        console.print(
            f"[yellow]warning:[/] --token-file {token_file} may be read or changed by {who} (mode {mode:04o}), "
            f"and whoever reads it can use the service: chmod 600 {token_file}",
            highlight=False,
        )
