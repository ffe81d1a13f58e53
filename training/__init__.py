"""Training, data preparation and evaluation for the bundled ENet. Not needed for serving."""
