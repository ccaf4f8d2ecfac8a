"""`ursa studio`: the whole flow in one local web app over a project folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ursa.cli._common import check_server, console, err_console

__all__ = ["DEFAULT_PROJECT", "studio_cmd"]

DEFAULT_PROJECT = Path("ursa-project")


def studio_cmd(
    path: Annotated[Path, typer.Argument(help="Project folder: one sub-folder per class (created if missing); runs/ and models/ go inside it.")] = DEFAULT_PROJECT,
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8765,
    host: Annotated[str, typer.Option("--host", help="Address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every network (then a token is required).")] = "127.0.0.1",
    token: Annotated[
        str | None, typer.Option("--token", envvar="URSA_TOKEN", show_envvar=True, help="Token the browser must present (it is in the printed address); generated when --host is not loopback.")
    ] = None,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Do not open a browser window.")] = False,
) -> None:
    """Open Ursa Studio: add classes and photos (files, webcam, URL lists), train, see the mistakes, fix them, try the model, export."""
    import socket

    from ursa.errors import ServeError
    from ursa.web.security import is_loopback, resolve_token
    from ursa.web.server import run
    from ursa.web.studio.app import create_studio_app

    check_server(port=port)
    token = resolve_token(host, token)
    app = create_studio_app(path, host=host, token=token)  # the project folder is made and checked before the port is taken
    try:  # a clear message instead of uvicorn's log line and exit(1)
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}). Another program is using the port: pass another --port.") from None
    if not is_loopback(host):
        err_console.print(f"[yellow]note:[/] binding {host}: other machines can reach the studio; they need the token in the address below.", highlight=False)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/{'?token=' + token if token else ''}"
    console.print(f"Ursa Studio on {path.resolve()} at {url}  (API docs at /docs; Ctrl-C stops)", highlight=False, soft_wrap=True)
    if not no_browser:
        import threading
        import webbrowser

        # a browser on this machine reaches a wildcard bind through loopback
        local = url.replace(f"//{shown}:", "//127.0.0.1:") if host in ("0.0.0.0", "::") else url
        threading.Timer(1.0, webbrowser.open, args=(local,)).start()
    run(app, host=host, port=port, log_level="warning", limit_concurrency=128)
