"""The method reference in docs/ is generated from the registry and must not go stale."""

from __future__ import annotations

from pathlib import Path

from taskvec.methods.reference import method_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_methods_doc_matches_the_registry() -> None:
    assert DOC.read_text().rstrip() == method_reference().rstrip(), (
        "docs/methods.md is stale: regenerate it with "
        "`.venv/bin/taskvec methods --markdown > docs/methods.md`"
    )


def test_every_method_says_how_it_stands_against_mergekit_and_its_paper() -> None:
    from taskvec.methods import all_methods
    from taskvec.methods.reference import VERSUS

    missing = sorted(set(all_methods()) - set(VERSUS))
    assert not missing, f"add these to methods/reference.py VERSUS: {missing}"
