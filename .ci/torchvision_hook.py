"""Installed by .ci/vllm_env into the vLLM environment, imported by a .pth file at interpreter start.

The torchvision wheel there is a CUDA build whose extension cannot load beside the CPU torch; its
Python side then fails on `register_fake("torchvision::nms")`. Just before torchvision first imports,
define the schemas of the operators that extension would have registered. Lazy (a meta-path finder),
so that interpreters that never import torchvision do not pay for importing torch."""
import importlib.abc
import sys


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch
            if torch.version.cuda is None:
                lib = torch.library.Library("torchvision", "DEF")
                for op in ("nms", "qnms"):
                    lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                sys.modules[__name__]._lib = lib  # a Library's definitions live as long as the object
        return None


sys.meta_path.insert(0, _Hook())
