"""HTTP controllers, one per domain: jobs, models, health."""

from service.api.controllers.health import HealthController
from service.api.controllers.jobs import JobsController
from service.api.controllers.models import ModelsController

__all__ = ["HealthController", "JobsController", "ModelsController"]
