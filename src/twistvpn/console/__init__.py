"""
The admin web console, served by the rendezvous: networks, the member
table with its "Auth?" checkbox, pre-auth keys.  Every action goes through
the admin API (L{twistvpn.rendezvous.admin.AdminAPI.call}).
"""
