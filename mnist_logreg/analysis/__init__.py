"""Reading a store afterwards: the comparison of a sweep (table and plots), the Model Registry, and
reproduce's verdict."""
