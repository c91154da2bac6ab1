"""A minimal Django project serving `django_atp`'s views.

No middleware, no database, DEBUG off: the least work Django can do per
request, so the comparison is as kind to Python as it can be.
"""

SECRET_KEY = "atp-bench-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["django_atp"]
MIDDLEWARE = []
ROOT_URLCONF = "django_urls"
DATABASES = {}
USE_TZ = True
