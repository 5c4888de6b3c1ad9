"""The packages whose names are imported on first use (``nodes.lazy_exports``) still export
every name they list, and only those."""

import importlib
import sys

import pytest

LAZY = ("nodes.dimse", "nodes.store")


@pytest.mark.parametrize("package", LAZY)
def test_every_listed_name_resolves_to_its_submodules_object(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        defined_in = [m for m, mod in list(sys.modules.items())
                      if m.startswith("nodes.") and m != package
                      and getattr(mod, name, None) is value]
        assert defined_in, f"{package}.{name} is not the object of any nodes submodule"


@pytest.mark.parametrize("package", LAZY)
def test_an_unknown_name_is_an_attribute_error(package):
    module = importlib.import_module(package)
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        exec(f"from {package} import no_such_name", {})
