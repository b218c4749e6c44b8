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


@pytest.fixture
def fit():
    """Train `sae` on `data` (a list of equal batches) with the generic trainer at lr 1e-2 into `folder`."""
    from saelab.training.config import TrainerConfig
    from saelab.training.trainer import Trainer

    def run(sae, data, folder):
        cfg = TrainerConfig(total_tokens=len(data) * data[0].shape[0], batch_size=data[0].shape[0], warmup_steps=2,
                            progress=False, log_every_steps=20, checkpoint_every_steps=None, lr=1e-2)
        return Trainer(sae, cfg, folder).fit(data)

    return run
