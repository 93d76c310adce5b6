"""The web dashboard a master serves at ``--http-listen`` (see ``app``)."""
