"""The misbehaving local server and the tiny images the collect tests share (conftest.py): they do what the
tests rely on."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import httpx
import pytest
from PIL import Image

if TYPE_CHECKING:
    from conftest import FaultServer


def test_server_serves_images_and_faults(server: FaultServer, make_jpeg) -> None:  # noqa: ANN001
    assert httpx.get(server.url("img/3.jpg")).content == make_jpeg(3)
    assert httpx.get(server.url("status/404")).status_code == 404
    with pytest.raises(httpx.TooManyRedirects):
        httpx.get(server.url("loop/x"), follow_redirects=True)


def test_bomb_png_claims_huge_size(bomb_png) -> None:  # noqa: ANN001
    with Image.open(io.BytesIO(bomb_png(50_000, 10))) as img:
        assert img.size == (50_000, 10)
