"""Controllers: each method or observer is one `attnctl.control.Controller`."""
