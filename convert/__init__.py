
import os

import vlm
from convert import hf as _hf

vlm.register_format("hf", lambda path: os.path.exists(os.path.join(path, "config.json")),
                    _hf.load_dir)
