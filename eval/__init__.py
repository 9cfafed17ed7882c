"""Reading results: tables, CSV and plots from run folders."""
