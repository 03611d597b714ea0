"""The built-in jobs on generated data: ``demo`` (score -> tune -> eval in a few CPU minutes) and ``proxy_dg``
(the proxy domain-generalisation benchmark of ``fisherscan bench``)."""
