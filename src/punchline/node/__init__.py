"""What every infrastructure node (supernode, relay, gateway) shares: enrolment with the CA."""
