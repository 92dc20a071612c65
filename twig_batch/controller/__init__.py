"""The latent controller (SPEC §4): condense, trigger, think, translate, shape, inject."""
from twig_batch.settings import ControllerConfig
from twig_batch.controller.controller import LatentController
from twig_batch.controller.trigger_log import TriggerLog, read_trigger_log, write_trigger_log
from twig_batch.controller.weights import ControllerNet, build_controller_net, load_weights, save_weights

__all__ = ["ControllerConfig", "ControllerNet", "LatentController", "TriggerLog", "build_controller_net",
           "load_weights", "read_trigger_log", "save_weights", "write_trigger_log"]
