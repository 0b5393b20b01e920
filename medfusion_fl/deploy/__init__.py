"""Running a real federation: key material (`certs`), the hospital agent's launcher (`site_agent`)."""
