"""The kept-FHIR patch: putting it back gives the partner's resource exactly; the record's changes win."""
from hypothesis import given, strategies as st

from mappings.residual import apply, diff, merge

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from(["a", "b", "x y", ""]))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["id", "code", "text", "extension", "value"]),
                                            inner, max_size=4)),
    max_leaves=12,
)
resources = st.dictionaries(st.sampled_from(["id", "status", "code", "note", "meta", "subject"]),
                            json_values, max_size=5)


@given(resources, resources)
def test_putting_the_patch_back_gives_the_source(base, source):
    assert merge(base, diff(base, source)) == source


@given(resources)
def test_no_difference_no_patch(resource):
    assert diff(resource, resource) is None


@given(resources, resources)
def test_the_patch_is_canonical(base, source):
    """Diffing the patched base again gives the same patch: a record keeps its kept FHIR unchanged
    through any number of round trips."""
    patch = diff(base, source)
    assert diff(base, merge(base, patch)) == patch


def test_a_change_made_since_import_wins_over_the_partner_value():
    base = {"status": "active", "note": [{"text": "a"}]}
    source = {"status": "on-hold", "note": [{"text": "a"}], "meta": {"source": "ehr"}}
    patch = diff(base, source)
    assert merge(base, patch) == source
    ours = {"status": "completed", "note": [{"text": "a"}]}
    assert merge(ours, patch) == {"status": "completed", "note": [{"text": "a"}], "meta": {"source": "ehr"}}


def test_an_element_the_partner_lacked_stays_out_unless_the_record_changed_it():
    base = {"status": "active", "text": {"div": "<div>generated</div>"}}
    source = {"status": "active"}
    patch = diff(base, source)
    assert merge(base, patch) == source
    assert merge({"status": "active", "text": {"div": "<div>new</div>"}}, patch)["text"] == {"div": "<div>new</div>"}


def test_list_items_are_merged_one_by_one_when_the_length_is_unchanged():
    base = {"identifier": [{"system": "s", "value": "1"}]}
    source = {"identifier": [{"system": "s", "value": "1", "period": {"start": "2020"}}]}
    patch = diff(base, source)
    assert apply({"identifier": [{"system": "s", "value": "2"}]}, patch) == {
        "identifier": [{"system": "s", "value": "2", "period": {"start": "2020"}}]}
