"""data.tokenize against ids produced once by open_clip's tokenizer (assets/tokenizer_fixture.json)."""
import json
import os

import pytest
import torch

import data

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tokenizer_fixture.json")


def _fixture():
    with open(FIXTURE) as f:
        return json.load(f)


def test_cleaning_is_clips():
    """What CLIP's cleaning does before BPE: lower case, whitespace collapsed, HTML unescaped twice (alt-text is often
    double-escaped), mojibake repaired by ftfy; special tokens written in a text become the special ids."""
    same = [("A  Diagram\n", "a diagram"), ("&amp;amp; co", "& co"), ("caf\u00c3\u00a9", "caf\u00e9"),
            ("\t\n  ", ""), ("Tom &amp; Jerry", "tom & jerry")]
    for raw, clean in same:
        assert torch.equal(data.tokenize(raw), data.tokenize(clean)), (raw, clean)
    assert data.tokenize("")[0, :3].tolist() == [data.SOT, data.EOT, 0]
    assert data.tokenize("<start_of_text>")[0, :3].tolist() == [data.SOT, data.SOT, data.EOT]
    assert not torch.equal(data.tokenize("a dog"), data.tokenize("a cat"))


@pytest.mark.parametrize("context_length,key", [(77, "cases"), (16, "short_context")])
def test_matches_open_clip(context_length, key):
    fx = _fixture()
    cases = fx[key] if key == "cases" else fx[key]["cases"]
    got = data.tokenize([c["text"] for c in cases], context_length=context_length)
    want = torch.tensor([c["ids"] for c in cases])
    bad = [(cases[i]["text"][:40], (got[i] != want[i]).nonzero()[:3].flatten().tolist())
           for i in range(len(cases)) if not torch.equal(got[i], want[i])]
    assert not bad, f"{len(bad)} of {len(cases)} strings differ (text, first differing positions): {bad[:5]}"


def test_known_ids_and_shape():
    x = data.tokenize("a diagram")
    assert x.dtype == torch.long and x.shape == (1, 77)
    assert x[0, :5].tolist() == [49406, 320, 22697, 49407, 0]
    assert data.tokenize(["a diagram", "a dog"], context_length=8).shape == (2, 8)


def test_truncation_keeps_eot_last():
    x = data.tokenize("cat " * 200, context_length=10)[0]
    assert x.tolist() == [data.SOT] + [2368] * 8 + [data.EOT]  # 2368 = "cat</w>"
    y = data.tokenize("cat " * 8, context_length=10)[0]  # exactly fits: no cut
    assert torch.equal(x, y)
