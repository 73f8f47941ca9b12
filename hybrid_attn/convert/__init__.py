"""Importers of other frameworks' weights onto our parameter trees."""
