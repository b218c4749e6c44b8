import torch

from saelab.interp.logits import decoder_directions, logit_effects, reads_residual_stream
from saelab.saes import create_sae


def test_shallow_direction_is_the_normalised_decoder_row() -> None:
    sae = create_sae("topk", d_in=6, n_latents=10, k=2, preprocessing="scale", input_scale=3.0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.arange(1, 11).float()[:, None])  # rows of different norms
    directions = decoder_directions(sae, [2, 7], [0.5, 4.0])
    expected = sae.W_dec[[2, 7]] / sae.W_dec[[2, 7]].norm(dim=1, keepdim=True)
    torch.testing.assert_close(directions, expected.detach())


def test_deep_direction_goes_through_the_nonlinear_decoder() -> None:
    sae = create_sae("deep", d_in=4, n_latents=8, k=2, encoder_multiples=[2.0])
    with torch.no_grad():
        for bias in sae.b_dec:
            bias.normal_()
    strength = 3.0

    def decode_by_hand(z: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(z @ sae.W_dec[0] + sae.b_dec[0])
        return hidden @ sae.W_dec[1] + sae.b_dec[1]

    z = torch.zeros(8)
    z[5] = strength
    delta = decode_by_hand(z) - decode_by_hand(torch.zeros(8))
    direction = decoder_directions(sae, [5], [strength])[0]
    torch.testing.assert_close(direction, (delta / delta.norm()).detach())
    assert torch.isclose(direction.norm(), torch.tensor(1.0))


def test_logit_effects_pick_the_extreme_tokens() -> None:
    unembedding = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-2.0, 0.2], [0.5, 0.5], [0.1, -3.0]])  # vocab 5, d 2
    top_v, top_i, bottom_v, bottom_i = logit_effects(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), unembedding, k=2)
    assert top_i.tolist() == [[0, 3], [1, 3]] and bottom_i.tolist() == [[2, 1], [4, 0]]
    torch.testing.assert_close(top_v, torch.tensor([[1.0, 0.5], [1.0, 0.5]]))
    torch.testing.assert_close(bottom_v, torch.tensor([[-2.0, 0.0], [-3.0, 0.0]]))


def test_residual_stream_sites() -> None:
    assert reads_residual_stream("resid_post.6") and reads_residual_stream("mlp_out.2")
    assert not reads_residual_stream("mlp_in.3") and not reads_residual_stream(None)
