"""The CLIP loss against open_clip's reference and a value computed by hand."""

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipsearch.loss import ClipLoss, contrastive_loss


def _features(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def test_hand_computed_two_pairs():
    # Orthogonal unit features: similarity matrix [[1, 0], [0, 1]] * scale, so each row's
    # cross-entropy is log(1 + e^-s) for both directions.
    img = torch.eye(2)
    txt = torch.eye(2)
    s = torch.tensor(2.0)
    expected = math.log(1 + math.exp(-2.0))
    assert ClipLoss()(img, txt, s).item() == pytest.approx(expected, rel=1e-6)


def test_matches_open_clip_loss_and_gradients():
    img, txt = _features()
    scale = torch.tensor(14.3)
    a_img, a_txt, a_s = (t.clone().requires_grad_() for t in (img, txt, scale))
    b_img, b_txt, b_s = (t.clone().requires_grad_() for t in (img, txt, scale))
    ours = ClipLoss()(a_img, a_txt, a_s)
    ref = open_clip.ClipLoss()(b_img, b_txt, b_s)
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for x, y in ((a_img, b_img), (a_txt, b_txt), (a_s, b_s)):
        torch.testing.assert_close(x.grad, y.grad)


def test_local_rows_average_to_the_global_loss():
    # The "local loss" of every slice of rows, averaged, is the full loss (what ranks compute).
    img, txt = _features(n=8)
    s = torch.tensor(5.0)
    full = contrastive_loss(img, txt, s)
    parts = [
        contrastive_loss(
            img[r * 4 : (r + 1) * 4],
            txt[r * 4 : (r + 1) * 4],
            s,
            row_offset=r * 4,
            all_image_features=img,
            all_text_features=txt,
        )
        for r in range(2)
    ]
    assert (sum(parts) / 2).item() == pytest.approx(full.item(), rel=1e-6)


def test_bfloat16_inputs_are_scored_in_float32():
    img, txt = _features()
    s = torch.tensor(10.0)
    low = contrastive_loss(img.bfloat16(), txt.bfloat16(), s.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(contrastive_loss(img, txt, s).item(), abs=0.05)
