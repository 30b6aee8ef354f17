"""Packaged Jinja2 templates of buildbot-mailext, installed as buildbot_mailext.packaged_templates."""
