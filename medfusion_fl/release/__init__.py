"""What leaves a site: the inventory of released figures, the evaluation release and the outbound audit log."""
