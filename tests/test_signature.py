import pytest

from graft.runtime.errors import InputSpecError
from graft.runtime.signature import TensorSpec, parse_shape, parse_spec


def test_parse_spec_static_and_symbolic():
    assert parse_spec("x:8x128:int64") == TensorSpec("x", [8, 128], "int64")
    assert parse_spec("ids:batchx128:int32") == TensorSpec("ids", ["batch", 128], "int32")
    assert parse_spec("h:batch,max_len,64:float16").shape == ["batch", "max_len", 64]
    assert parse_spec("s:scalar:float32").shape == []
    assert parse_spec("y:4x4").dtype == "float32"


@pytest.mark.parametrize("text, words", [
    ("x", "NAME:SHAPE:DTYPE"),
    ("x:8x128:complex7", "bad dtype 'complex7'"),
    ("x:8x-1:int64", "bad dim '-1'"),
    (":8:int64", "NAME:SHAPE:DTYPE"),
])
def test_parse_spec_errors_say_what_is_expected(text, words):
    with pytest.raises(InputSpecError, match=words.replace("(", r"\(")):
        parse_spec(text)


def test_parse_shape_round_trip():
    spec = TensorSpec("a", ["batch", 3, 224, 224], "float32")
    assert parse_shape(spec.shape_text()) == spec.shape
    assert str(spec) == "a:batchx3x224x224:float32"
