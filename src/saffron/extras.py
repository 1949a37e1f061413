"""Optional dependencies, imported on first use with one clear line when their extra is not installed.

The core install (``pip install saffron``) evaluates and generates; the verbs below need an extra:

===========  ==============================  =====================================
extra        packages                        needed by
===========  ==============================  =====================================
``serve``    fastapi, uvicorn, pydantic      ``saffron serve``, ``saffron bench serve``
``plot``     matplotlib                      ``saffron compare`` (its ASR-vs-TFLOP plot)
``ray``      ray                             ``--backend ray``, ``saffron bench ray``
``train``    pyarrow                         ``saffron build-rewards``, ``saffron train-mrm``
``online``   datasets                        datasets read from the Hugging Face hub
===========  ==============================  =====================================
"""

from __future__ import annotations

import importlib
from types import ModuleType

from saffron.errors import UnavailableError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise ``UnavailableError`` saying which extra of saffron brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise UnavailableError(f"{purpose} needs {top}, which is not installed: pip install 'saffron[{extra}]'") \
            from None
