"""What the reliability suites share: a fake OpenAI-compatible provider on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.asgi_servers import FakeOpenAI, serve


@pytest.fixture
def provider() -> Iterator[str]:
    """The provider's base address (http://127.0.0.1:PORT), served for the test."""
    with serve(FakeOpenAI().app()) as url:
        yield url
