"""The dataset registry and the error for data that is not there."""

from configs import default
import pytest

from semimeta_jax import data
from semimeta_jax.data import catalog


def _data_config(name, data_dir, **overrides):
  config = default.get_config().data
  config.name = name
  config.data_dir = data_dir
  config.update(overrides)
  return config


@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'svhn_cropped'])
def test_missing_dataset_names_it_and_the_fix(tmp_path, name):
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.dataset_info(_data_config(name, str(tmp_path)))
  message = str(error.value)
  assert repr(name) in message
  assert str(tmp_path / name) in message  # Where it looked.
  assert f'python -m semimeta_jax.prepare {name} --data_dir={tmp_path}' in message
  assert 'config.data.download=True' in message
  assert 'tfds build' not in message  # Needs apache_beam, which is not installed.


def test_missing_imagenet_explains_the_manual_download(tmp_path):
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.dataset_info(_data_config('imagenet2012', str(tmp_path)))
  message = str(error.value)
  assert "'imagenet2012'" in message
  assert 'ILSVRC2012_img_train.tar' in message
  assert 'ILSVRC2012_img_val.tar' in message
  assert f'{tmp_path}/downloads/manual' in message
  assert f'python -m semimeta_jax.prepare imagenet2012 --data_dir={tmp_path}' in message


def test_imagenet_download_without_the_archives_fails_clearly(tmp_path):
  config = _data_config('imagenet', str(tmp_path), download=True)
  with pytest.raises(data.DatasetNotFoundError,
                     match='ILSVRC2012_img_train.tar'):
    data.dataset_info(config)


def test_missing_data_fails_before_any_input_is_built(tmp_path):
  config = default.get_config()
  config.data.data_dir = str(tmp_path)
  with pytest.raises(data.DatasetNotFoundError, match='cifar10'):
    data.build_input(config, str(tmp_path), process_index=0, process_count=1)
  assert not (tmp_path / 'labeled_indices.json').exists()


def test_unknown_name():
  with pytest.raises(ValueError, match="Unknown dataset config.data.name='x'"):
    catalog.get_spec(_data_config('x', None))


@pytest.mark.parametrize('alias,name', [('svhn', 'svhn_cropped'),
                                        ('imagenet', 'imagenet2012')])
def test_aliases(alias, name):
  assert catalog.get_spec(_data_config(alias, None)).name == name


def test_imagenet_crop_size_is_configurable():
  spec = catalog.get_spec(_data_config('imagenet2012', None, image_size=64))
  assert spec.image_shape == (64, 64, 3)
  assert catalog.get_spec(_data_config('imagenet2012', None)).image_shape == (
      224, 224, 3)
