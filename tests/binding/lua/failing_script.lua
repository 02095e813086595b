-- A script that fails inside Redis, standing in for a real fault of a write in the middle of a create.
return redis.error_reply('ERR injected fault')
