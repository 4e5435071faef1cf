"""The loader's long properties (about 20 s of generated files): any mutated good file, any
near-valid pipeline and any random document load cleanly or fail with SpecErrors that name a
line and say something. They live here, not in tests/unit, so that the unit lane stays under a
minute; the generators and the checks are tests/unit/test_fuzz.py's, and the runs are
deterministic like its other properties (VMFARM_FUZZ_EXAMPLES=N hunts with random examples).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_fuzz import (
    _profile,
    assert_clean_load,
    bundle_dir,
    mutated_good_file,
    near_valid_pipeline,
    random_file,
    set_values,
)


@_profile(200)
@given(file=mutated_good_file(), inputs=set_values(), require=st.booleans())
def test_load_of_mutated_good_files_ends_in_a_clean_result(
    file: tuple[str, str], inputs: dict[str, str], require: bool
) -> None:
    with bundle_dir(*file) as root:
        assert_clean_load(root, inputs, require)


@_profile(200)
@given(file=near_valid_pipeline(), inputs=set_values(), require=st.booleans())
def test_load_of_near_valid_pipelines_ends_in_a_clean_result(
    file: tuple[str, str], inputs: dict[str, str], require: bool
) -> None:
    with bundle_dir(*file) as root:
        assert_clean_load(root, inputs, require)


@_profile(200)
@given(file=random_file(), inputs=set_values())
def test_load_of_random_documents_ends_in_a_clean_result(
    file: tuple[str, str], inputs: dict[str, str]
) -> None:
    with bundle_dir(*file) as root:
        assert_clean_load(root, inputs, False)
