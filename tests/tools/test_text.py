"""tx.text: per-token scores and their HTML / terminal rendering."""
import pytest
import torch

import torchex_fn as tx


def test_token_scores_sum_and_norm_with_mask():
    attr = torch.tensor([[[3.0, -4.0], [1.0, 1.0], [2.0, 0.0]],
                         [[0.0, -2.0], [0.5, 0.5], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    torch.testing.assert_close(tx.text.token_scores(attr), torch.tensor([[-1.0, 2.0, 2.0], [-2.0, 1.0, 18.0]]))
    torch.testing.assert_close(tx.text.token_scores(attr, "norm", attention_mask=mask),
                               torch.tensor([[5.0, 2 ** 0.5, 2.0], [2.0, 0.5 ** 0.5, 0.0]]))
    torch.testing.assert_close(tx.text.token_scores(attr, attention_mask=mask.bool())[1], torch.tensor([-2.0, 1.0, 0.0]))
    # from an attribution of a real model: integrated gradients at BERT's embeddings sum over hidden units
    grads = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    tx.text.token_scores(grads, "norm").sum().backward()          # differentiable
    assert grads.grad.shape == (2, 3, 4)


def test_token_scores_errors():
    with pytest.raises(ValueError, match=r"token_scores: expected attr of shape \[B, T, D\]"):
        tx.text.token_scores(torch.zeros(2))
    with pytest.raises(ValueError, match="token_scores: unknown reduce 'mean'"):
        tx.text.token_scores(torch.zeros(2, 3, 4), "mean")
    with pytest.raises(ValueError, match=r"token_scores: expected attention_mask of shape \[2, 3\]"):
        tx.text.token_scores(torch.zeros(2, 3, 4), attention_mask=torch.ones(2, 4))
    with pytest.raises(TypeError, match="token_scores: expected attr, a floating-point tensor"):
        tx.text.token_scores(torch.zeros(2, 3, 4, dtype=torch.long))


def test_to_html_exact_string_for_two_tokens():
    html = tx.text.to_html(["good", "film"], torch.tensor([0.5, -0.25]))
    assert html == ('<table class="torchex-text"><tr><td>'
                    '<mark style="background-color: hsl(120, 75%, 50%)" title="0.5">good</mark> '
                    '<mark style="background-color: hsl(0, 75%, 75%)" title="-0.25">film</mark>'
                    '</td></tr></table>')
    # two rows with labels, a shared scale: full colour only at |score| = scale
    two = tx.text.to_html([["a"], ["b"]], [[1.0], [-2.0]], labels=["pos", "neg"], scale=4.0)
    assert two == ('<table class="torchex-text">'
                   '<tr><td>pos</td><td><mark style="background-color: hsl(120, 75%, 88%)" title="1">a</mark></td></tr>'
                   '<tr><td>neg</td><td><mark style="background-color: hsl(0, 75%, 75%)" title="-2">b</mark></td></tr>'
                   '</table>')


def test_to_html_escapes_token_text_and_labels():
    html = tx.text.to_html(["<b>", "&amp", '"q"'], [1.0, 0.0, -1.0], labels=["<i>"])
    assert "<b>" not in html.replace("<table", "").replace("<tr>", "") and "&lt;b&gt;" in html
    assert "&amp;amp" in html and "&quot;q&quot;" in html and "&lt;i&gt;" in html
    assert "hsl(0, 75%, 100%)" not in html and "hsl(120, 75%, 100%)" in html    # 0 is white


def test_to_terminal_exact_string_for_two_tokens():
    out = tx.text.to_terminal(["good", "film"], torch.tensor([0.5, -0.25]))
    assert out == "\x1b[48;5;34mgood\x1b[0m \x1b[48;5;210mfilm\x1b[0m"
    assert tx.text.to_terminal([["a", "b"], ["c", "d"]], [[0.0, 1.0], [-1.0, 0.1]]) == (
        "a \x1b[48;5;34mb\x1b[0m\n\x1b[48;5;196mc\x1b[0m \x1b[48;5;194md\x1b[0m")


def test_rendering_errors():
    with pytest.raises(ValueError, match="to_html: expected one score per token"):
        tx.text.to_html(["a", "b"], [1.0])
    with pytest.raises(TypeError, match="to_terminal: expected tokens, a list of strings"):
        tx.text.to_terminal([1, 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="to_html: expected one label per example"):
        tx.text.to_html(["a"], [1.0], labels=["x", "y"])
