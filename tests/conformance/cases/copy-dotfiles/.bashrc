rc
