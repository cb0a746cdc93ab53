"""The tokenizer half of the GGUF export against llama.cpp's own material (default suite; skipped, with the fetch
command as the reason, where the assets are absent): real vocabularies of each tokenizer family, their test
vectors, and llama.cpp's pre-tokenizer table. No torch, no llama.cpp build: seconds."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from llamacpp_assets import (
    BPE_FAMILIES,
    SKIP_REASON,
    SPM_FAMILIES,
    _gguf_fields,
    assets_dir,
    reference_pre_table,
    tokenizer_dir,
    vectors,
    vocab_gguf,
)

from llfarm.errors import ExportError
from llfarm.export.pre_hashes import CHKTXT, PRE_BY_HASH
from llfarm.export.vocab import bpe_vocab, read_spm_model, spm_vocab

pytestmark = pytest.mark.skipif(assets_dir() is None, reason=SKIP_REASON)
# The vocab GGUFs were written by older converters. Today's reference maps MPT's hash to "olmo" (its `if`s run in
# order and the last match wins), marks added tokens that look special (<|...|>) CONTROL, and pads with UNUSED.
TODAY_PRE = {"mpt": "olmo"}


def todays_types(ref: dict) -> list[int]:
    from llfarm.export.vocab import looks_special

    return [5 if tok.startswith("[PAD") else 3 if ty == 4 and looks_special(tok) else ty
            for tok, ty in zip(ref["tokenizer.ggml.tokens"], ref["tokenizer.ggml.token_type"])]


def test_pre_table_equals_the_references():
    chktxt, table = reference_pre_table()
    assert CHKTXT == chktxt
    assert PRE_BY_HASH == {h: name for h, (name, _) in table.items()}


@pytest.mark.parametrize("family", list(BPE_FAMILIES))
def test_rebuilt_bpe_tokenizers_match_llamacpp_vectors(family):
    """The fixture itself: the Hugging Face tokenizer rebuilt from the family's vocab GGUF tokenizes llama.cpp's
    test inputs to its expected ids, so what the export tests feed in is that family's real tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir(family) / "tokenizer.json"))
    for text, ids in vectors(family):
        assert tok.encode(text, add_special_tokens=False).ids == ids, text


@pytest.mark.parametrize("family", SPM_FAMILIES)
def test_rebuilt_sentencepiece_models_match_llamacpp_vectors(family):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(tokenizer_dir(family) / "tokenizer.model"))
    for text, ids in vectors(family):
        assert sp.encode(text) == ids, text


@pytest.mark.parametrize("family", list(BPE_FAMILIES))
def test_bpe_vocab_is_llamacpps(family):
    """tokenizer.ggml.pre by llama.cpp's hash; tokens, types and merges as in the family's vocab GGUF."""
    ref = _gguf_fields(vocab_gguf(family))
    vocab = bpe_vocab(tokenizer_dir(family), len(ref["tokenizer.ggml.tokens"]), family)
    assert (vocab.model, vocab.pre, vocab.source) == ("gpt2", TODAY_PRE.get(family, ref["tokenizer.ggml.pre"]),
                                                      "tokenizer.json (hash)")
    assert vocab.tokens == ref["tokenizer.ggml.tokens"]
    assert vocab.types == todays_types(ref)
    assert vocab.special.merges == ref["tokenizer.ggml.merges"]
    assert vocab.special.ids["bos"] == ref["tokenizer.ggml.bos_token_id"]


@pytest.mark.parametrize("family", SPM_FAMILIES)
def test_sentencepiece_vocab_from_tokenizer_model(family):
    """From tokenizer.model: the pieces, scores and types llama.cpp's converter wrote into the vocab GGUF."""
    ref = _gguf_fields(vocab_gguf(family))
    folder = tokenizer_dir(family)
    vocab = spm_vocab(folder, folder / "tokenizer.model", len(ref["tokenizer.ggml.tokens"]), family,
                      phi3=family == "phi-3")
    assert (vocab.model, vocab.pre, vocab.source) == ("llama", "default", "tokenizer.model")
    assert [t.decode() for t in vocab.tokens] == ref["tokenizer.ggml.tokens"]
    n = 32000  # the SentencePiece model's own pieces (Phi-3's added tokens above them score -1000 in both)
    assert vocab.scores[3:n] == pytest.approx(ref["tokenizer.ggml.scores"][3:n])
    assert vocab.types[3:] == todays_types(ref)[3:]
    assert vocab.add_space_prefix is None  # Llama 2's model adds the dummy prefix: llama.cpp's default


@pytest.mark.parametrize("family", SPM_FAMILIES)
def test_sentencepiece_vocab_from_tokenizer_json_alone(family, tmp_path):
    """What a transformers 5 save_pretrained leaves (tokenizer.json, no tokenizer.model): the same tokens and
    types, and scores that order the merged pieces as the SentencePiece model does (llama.cpp merges the
    highest-scoring pair first) — except '▁▁', which transformers' conversion puts first in tokenizer.json's
    merges (the tokenizer trained on is tokenizer.json, so llfarm follows it); the reference would write -1000 for
    every score here, i.e. no merge order at all."""
    folder = tmp_path / family
    shutil.copytree(tokenizer_dir(family), folder)
    (folder / "tokenizer.model").unlink()
    n_vocab = len(_gguf_fields(vocab_gguf(family))["tokenizer.ggml.tokens"])
    from_json = spm_vocab(folder, None, n_vocab, family, phi3=family == "phi-3")
    from_model = spm_vocab(tokenizer_dir(family), tokenizer_dir(family) / "tokenizer.model", n_vocab, family,
                           phi3=family == "phi-3")
    assert from_json.tokens == from_model.tokens and from_json.types == from_model.types
    merged = [i for i, t in enumerate(from_model.tokens[:32000]) if from_model.types[i] == 1 and len(t.decode()) > 1]
    model_scores = np.array([from_model.scores[i] for i in merged])
    json_scores = np.array([from_json.scores[i] for i in merged])
    order = np.argsort(-model_scores, kind="stable")
    inversions = np.where(np.diff(json_scores[order]) > 0)[0]
    assert {from_model.tokens[merged[order[k + 1]]].decode() for k in inversions} == {"\u2581\u2581"}
    assert len(set(json_scores.tolist())) > 0.99 * len(merged)


def test_unigram_and_normalizing_sentencepiece_models_are_refused(tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    base = pb.ModelProto()
    base.ParseFromString((tokenizer_dir("llama-spm") / "tokenizer.model").read_bytes())
    for change, reason in [(lambda m: setattr(m.trainer_spec, "model_type", 1), "Unigram"),
                           (lambda m: setattr(m.normalizer_spec, "precompiled_charsmap", b"\x01\x02"), "charsmap"),
                           (lambda m: setattr(m.normalizer_spec, "remove_extra_whitespaces", True), "whitespace")]:
        model = pb.ModelProto()
        model.CopyFrom(base)
        change(model)
        path = tmp_path / "tokenizer.model"
        path.write_bytes(model.SerializeToString())
        assert read_spm_model(path).pieces[:3] == read_spm_model(tokenizer_dir("llama-spm") / "tokenizer.model").pieces[:3]
        with pytest.raises(ExportError, match=reason):
            spm_vocab(tokenizer_dir("llama-spm"), path, 32000, "x")


def test_a_pre_tokenizer_llamacpp_does_not_know_is_refused(tmp_path):
    """The same vocabulary with a pre-tokenizer that is not one llama.cpp implements: unknown hash, no structural
    match → refused, never written with a guessed tokenizer.ggml.pre."""
    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dir("gpt-2"), folder)
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}{1,5}|\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ExportError, match="not one llama.cpp knows"):
        bpe_vocab(folder, None, "tok")
