"""`ursa serve`: a web page and a JSON API for an exported model."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ursa.cli._common import BackendOpt, Int8Opt, ModelArg, check_server, console, err_console

__all__ = ["serve_cmd"]


def serve_cmd(
    model: ModelArg,
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    host: Annotated[str, typer.Option("--host", help="Address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every network.")] = "127.0.0.1",
    int8: Int8Opt = False,
    backend: BackendOpt = "auto",
    concurrency: Annotated[Optional[int], typer.Option("--concurrency", help="Predictions running at once (default: cores, at most 4).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="ONNX Runtime threads per prediction (default: cores / concurrency).")] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest upload accepted, in MiB.")] = 10.0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No access log.")] = False,
    token: Annotated[Optional[str], typer.Option("--token", envvar="URSA_TOKEN", show_envvar=True, help="Token clients must send (Authorization: Bearer, or ?token= in the page's address); generated when --host is not loopback.")] = None,
) -> None:
    """Serve a web page and a JSON API (POST /predict, GET /health, GET /model, /docs) for an exported model."""
    from ursa.web.predict_app import serve
    from ursa.web.security import is_loopback, resolve_token

    check_server(port=port, concurrency=concurrency, threads=threads, max_upload_mb=max_upload_mb)
    token = resolve_token(host, token)
    if not is_loopback(host):
        err_console.print(f"[yellow]note:[/] binding {host}: other machines can reach this server; they need the token in the address below "
                          "(or the header 'Authorization: Bearer TOKEN').", highlight=False)  # fmt: skip
    shown = f"[{host}]" if ":" in host else host
    console.print(f"serving {model} at http://{shown}:{port}/{'?token=' + token if token else ''}  (API docs at /docs; Ctrl-C stops)", highlight=False, soft_wrap=True)
    serve(model, host=host, port=port, concurrency=concurrency, threads=threads, max_upload_bytes=int(max_upload_mb * 2**20),
          backend=backend, precision="int8" if int8 else "fp32", access_log=not quiet, token=token)  # fmt: skip
