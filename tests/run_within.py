"""`within(seconds, fn)`: run something that could hang (a spinning tf.data pipeline) with a
deadline, so a test fails instead of blocking the suite."""

import threading


def within(seconds, fn):
  """fn()'s result (or its exception), or a test failure when it takes longer than `seconds`.

  fn runs in a daemon thread, so a call that never returns is left behind, not waited for.
  """
  result = {}

  def run():
    try:
      result['value'] = fn()
    except Exception as e:  # pylint: disable=broad-except
      result['error'] = e

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f'still running after {seconds} s (spinning?)'
  if 'error' in result:
    raise result['error']
  return result['value']
