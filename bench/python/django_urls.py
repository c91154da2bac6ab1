"""`django_atp`'s URLs (`atp/<toolkit>/<tool>/`, `atp/<toolkit>/`) at the root."""

from django.urls import include, path

import atp_tools  # noqa: F401  Ensure toolkit registration

urlpatterns = [path("", include("django_atp.urls"))]
