# SPDX-License-Identifier: Apache-2.0
"""Sandboxed chat templates. Oracle: transformers' apply_chat_template on the same template."""
import pytest

from mindie_llm.tokenizer.chat_template import ChatTemplateError, render

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi \"there\" 世界"}]


def test_matches_transformers(hf_tokenizer):
    tok = hf_tokenizer.tok
    for add in (True, False):
        want = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=add)
        got = render(tok.chat_template, MSGS, add_generation_prompt=add, bos_token=tok.bos_token,
                     eos_token=tok.eos_token)
        assert got == want


def test_helpers_available():
    t = "{{ messages | tojson }}{% if messages|length > 5 %}{{ raise_exception('too many') }}{% endif %}"
    assert render(t, MSGS).startswith('[{"role": "system"')
    t2 = "{{ raise_exception('no system messages') }}"
    with pytest.raises(ChatTemplateError, match="no system messages"):
        render(t2, MSGS)
    assert len(render("{{ strftime_now('%Y') }}", MSGS)) == 4


@pytest.mark.parametrize("evil", [
    "{{ raise_exception.__globals__['os'].system('touch pwned') }}",
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{% set x = messages.append({'role': 'x'}) %}{{ messages|length }}",
])
def test_sandbox_refuses_internals(evil, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ChatTemplateError, match="chat_template"):
        render(evil, [dict(m) for m in MSGS])
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("bad", [[], "hi", [{"content": "x"}], [{"role": "user", "content": 3}], ["x"]])
def test_bad_messages(bad):
    with pytest.raises(ValueError, match="messages"):
        render("{{ messages }}", bad)


def test_missing_or_broken_template():
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render(None, MSGS)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render("{% for %}", MSGS)
