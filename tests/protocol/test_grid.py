"""check_grid, THE grid validator: what it accepts, and one error naming the parameter for what it refuses."""

import math

import pytest

from linft.errors import LinftError
from linft.protocol.grid import check_grid

DOMAINS = ["photo", "sketch", "Real World"]
GOOD = dict(seeds=2, lrs=(1e-3,), weight_decays=(0.0, 1e-4), dropouts=(0.0, 0.9))


def test_accepts_a_grid_and_returns_the_held_out_domains():
    assert check_grid(DOMAINS, **GOOD) == DOMAINS  # none given: every domain
    assert check_grid(DOMAINS, test_domains=[], **GOOD) == DOMAINS
    assert check_grid(DOMAINS, test_domains=["Real World", "photo"], **GOOD) == ["Real World", "photo"]
    assert check_grid(["a", "b"], **GOOD) == ["a", "b"]  # two domains are enough
    assert check_grid(DOMAINS, **{**GOOD, "dropouts": ()}, probe=True) == DOMAINS  # probing alone is a grid


@pytest.mark.parametrize("change", [dict(lrs=()), dict(weight_decays=()), dict(seeds=0), dict(seeds=-1),
                                    dict(dropouts=())])
def test_refuses_an_empty_grid(change):
    with pytest.raises(LinftError, match="the grid is empty"):
        check_grid(DOMAINS, **{**GOOD, **change})


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1, math.nan])
def test_refuses_a_dropout_rate_outside_0_1(rate):
    with pytest.raises(LinftError, match=r"dropout rate .* is outside \[0, 1\)") as err:
        check_grid(DOMAINS, **{**GOOD, "dropouts": (0.5, rate)})
    if rate == 1.0:
        assert "dropout rate 1.0 is outside [0, 1)" in str(err.value)


@pytest.mark.parametrize("lr", [-1e-3, 0.0, math.nan, math.inf])
def test_refuses_a_learning_rate_that_is_not_finite_and_positive(lr):
    with pytest.raises(LinftError, match="learning rates must be finite and positive"):
        check_grid(DOMAINS, **{**GOOD, "lrs": (1e-3, lr)})


@pytest.mark.parametrize("wd", [-1e-4, math.nan, math.inf])
def test_refuses_a_weight_decay_that_is_negative_or_not_finite(wd):
    with pytest.raises(LinftError, match="weight decays must be finite and >= 0"):
        check_grid(DOMAINS, **{**GOOD, "weight_decays": (0.0, wd)})


def test_refuses_an_unknown_held_out_domain_by_name():
    with pytest.raises(LinftError) as err:
        check_grid(DOMAINS, test_domains=["photo", "zz"], **GOOD, where="the cache")
    message = str(err.value)
    assert "held-out domain 'zz' is not in the cache" in message  # the fragment train_linear's users know
    assert "'photo'" not in message and "choose from photo, sketch, Real World" in message
    with pytest.raises(LinftError, match="held-out domain 'Photo' is not in the data"):
        check_grid(DOMAINS, test_domains=["Photo"], **GOOD)  # names are compared exactly


@pytest.mark.parametrize("domains,text", [(["only"], "1 domain"), ([], "0 domains")])
def test_refuses_a_dataset_with_fewer_than_two_domains(domains, text):
    with pytest.raises(LinftError, match=f"the cache has {text}; leave-one-domain-out needs at least 2"):
        check_grid(domains, **GOOD, where="the cache")


@pytest.mark.parametrize("field,values,named", [
    ("test_domains", ["photo", "sketch", "photo"], "test_domains repeats 'photo'"),
    ("lrs", (1e-3, 5e-4, 1e-3), "lrs repeats 0.001"),
    ("weight_decays", (1e-4, 1e-4), "weight_decays repeats 0.0001"),
    ("dropouts", (0.9, 0.0, 0.9), "dropouts repeats 0.9"),
])
def test_refuses_a_value_given_twice(field, values, named):
    """A repeated value would train the same run twice and write its records twice."""
    with pytest.raises(LinftError, match=named):
        check_grid(DOMAINS, **{**GOOD, field: values})


def test_refuses_a_fractional_number_of_seeds():
    with pytest.raises(LinftError, match="seeds must be a whole number"):
        check_grid(DOMAINS, **{**GOOD, "seeds": 2.5})


def test_refuses_a_domain_without_usable_images():
    """A domain whose every image was skipped has no o.o.d. accuracy when held out and no batch when trained on."""
    assert check_grid(DOMAINS, **GOOD, usable=[3, 1, 2]) == DOMAINS
    with pytest.raises(LinftError, match="domain 'sketch' has no usable image in the cache"):
        check_grid(DOMAINS, test_domains=["photo"], **GOOD, usable=[3, 0, 2], where="the cache")
