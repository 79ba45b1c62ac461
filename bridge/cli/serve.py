"""``pdl1 serve``: the HTTP service the QuPath scripts call."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bridge.cli.common import console, fail, pipeline_config
from inference import Pdl1Error


def serve(
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8765,
    token: Annotated[
        str | None, typer.Option(help="Shared secret every request must send as 'Authorization: Bearer TOKEN'.")
    ] = None,
    allow_root: Annotated[
        list[Path] | None,
        typer.Option(help="Folder whose images may be opened (repeatable; default: the current folder)."),
    ] = None,
    models: Annotated[
        Path | None, typer.Option(help="Folder with seg/ and nuclei/ model folders (default: shipped demo).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    keep_results: Annotated[
        int,
        typer.Option(
            min=1, help="Results of this many finished jobs are held for clients to fetch; older ones are released."
        ),
    ] = 16,
) -> None:
    """Start the HTTP service the QuPath scripts call (FastAPI + uvicorn; OpenAPI at /docs)."""
    try:
        import uvicorn

        from bridge.service import ServiceSettings, create_app
    except ImportError as err:
        raise fail(Pdl1Error(f"the service needs the 'serve' extra: pip install 'pdl1-bridge[serve]' ({err})")) from err
    seg = nuclei = None
    if models is not None:
        seg, nuclei = models / "seg", models / "nuclei"
    try:
        settings = ServiceSettings(
            host=host,
            port=port,
            token=token,
            allow_roots=tuple(allow_root or (Path.cwd(),)),
            pipeline=pipeline_config(device, seg, nuclei, None),
            keep_results=keep_results,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--host/--token/--allow-root") from err
    console.print(
        f"pdl1 serve on http://{host}:{port} (images under {', '.join(str(r) for r in settings.allow_roots)})"
    )
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
