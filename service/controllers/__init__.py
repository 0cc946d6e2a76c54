"""HTTP controllers, one per domain: jobs, models, health."""

from service.controllers.health import HealthController
from service.controllers.jobs import JobsController
from service.controllers.models import ModelsController

__all__ = ["HealthController", "JobsController", "ModelsController"]
