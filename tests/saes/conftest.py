import pytest

from saelab.saes import native


@pytest.fixture(params=["native", "torch"])
def topk_path(request, monkeypatch) -> str:
    """Run a test through the compiled top-k kernel and through the pure-torch path that replaces it where it
    cannot be built."""
    if request.param == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    elif native.library() is None:
        pytest.skip("no C compiler here: the native top-k kernel cannot be built (the torch path is tested)")
    return request.param
