"""The embedded synthetic demo data of the three tasks (``--DATASET=demo``); importing this
package registers each task's builder with ``core.tasks.base.DEMO_BUILDERS``.
``python3 -m demo [--task vqa|vgd|itm|all]`` builds them (demo/__main__.py)."""
from core.tasks.base import DEMO_BUILDERS
from demo.itm import build_itm_demo
from demo.vgd import build_vgd_demo
from demo.vqa import build_vqa_demo

DEMO_BUILDERS.update(vqa=build_vqa_demo, vgd=build_vgd_demo, itm=build_itm_demo)
# the folder (under the demo root) holding each task's completion marker, for --force
MARKER_DIRS = {"vqa": "vqa", "vgd": "vgd/demo", "itm": "itm"}
