"""Reading a Hugging Face model directory reads only files inside it, and every parse error names
the file (moegrow/hf/files.py, moegrow/hf/convert.py). The directories are written with the
safetensors library's own numpy API, an independent writer."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from moegrow.configs import lm
from moegrow.hf import convert, files


def model_dir(path, index_map=None) -> str:
  """A two-shard directory: a.safetensors (x), b.safetensors (y) and an index mapping them."""
  os.makedirs(path)
  save_file({"x": np.arange(6, dtype=np.float32)}, os.path.join(path, "a.safetensors"))
  save_file({"y": np.ones((2, 3), np.float32)}, os.path.join(path, "b.safetensors"))
  with open(os.path.join(path, files.INDEX), "w") as f:
    json.dump({"metadata": {}, "weight_map": index_map or {"x": "a.safetensors", "y": "b.safetensors"}}, f)
  return str(path)


def test_an_index_inside_the_directory_reads_every_tensor(tmp_path):
  r = files.Reader(model_dir(tmp_path / "m"))
  np.testing.assert_array_equal(r.get("x"), np.arange(6, dtype=np.float32))
  np.testing.assert_array_equal(r.get("y"), np.ones((2, 3), np.float32))
  r.close()


@pytest.mark.parametrize("name", ["../elsewhere.safetensors", "/etc/passwd", "sub/../../b.safetensors"])
def test_a_shard_named_outside_the_directory_is_refused(tmp_path, name):
  save_file({"x": np.zeros(6, np.float32)}, str(tmp_path / "elsewhere.safetensors"))
  d = model_dir(tmp_path / "m", {"x": name, "y": "b.safetensors"})
  with pytest.raises(ValueError, match=rf"{files.INDEX} names the file {name!r}, which is outside {d}"):
    files.Reader(d)


def test_a_link_leading_out_of_the_directory_is_refused(tmp_path):
  save_file({"x": np.zeros(6, np.float32)}, str(tmp_path / "elsewhere.safetensors"))
  d = model_dir(tmp_path / "m")
  os.remove(os.path.join(d, "a.safetensors"))
  os.symlink(tmp_path / "elsewhere.safetensors", os.path.join(d, "a.safetensors"))
  with pytest.raises(ValueError, match=r"names the file 'a.safetensors', which is outside"):
    files.Reader(d)


def test_a_config_that_does_not_parse_is_named(tmp_path):
  d = model_dir(tmp_path / "m")
  with open(os.path.join(d, "config.json"), "w") as f:
    f.write("{'not': json,")
  base = lm.get_config("tiny")
  base.mesh.update(data=1, num_devices=1)
  with pytest.raises(ValueError, match=rf"{os.path.join(d, 'config.json')} is not valid JSON: Expecting property name"):
    convert.import_model(d, str(tmp_path / "run"), base)
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump({"architectures": ["LlamaForCausalLM"], "hidden_size": 16}, f)
  with pytest.raises(ValueError, match=rf"{os.path.join(d, 'config.json')}: required field 'num_attention_heads' is "
                                       r"missing"):
    convert.import_model(d, str(tmp_path / "run"), base)


def test_an_index_that_does_not_parse_is_named(tmp_path):
  d = model_dir(tmp_path / "m")
  with open(os.path.join(d, files.INDEX), "w") as f:
    f.write('{"weight_map": ')
  with pytest.raises(ValueError, match=rf"{os.path.join(d, files.INDEX)} is not valid JSON"):
    files.Reader(d)
  with open(os.path.join(d, files.INDEX), "w") as f:
    json.dump({"weight_map": ["a.safetensors"]}, f)
  with pytest.raises(ValueError, match=r"has no 'weight_map' dict"):
    files.Reader(d)


def test_a_shard_that_is_not_safetensors_is_named(tmp_path):
  d = model_dir(tmp_path / "m")
  with open(os.path.join(d, "b.safetensors"), "wb") as f:
    f.write(b"\x00" * 64)
  r = files.Reader(d)
  with pytest.raises(ValueError, match=rf"{os.path.join(d, 'b.safetensors')} is not a readable safetensors file"):
    r.get("y")
  r.close()
