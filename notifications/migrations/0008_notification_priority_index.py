# The admin's priority filter reads this index (only high-priority rows, in id order).
# Built CONCURRENTLY, so a table of millions of rows keeps taking writes meanwhile; that
# cannot run inside a transaction, hence atomic = False.

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):

    atomic = False

    dependencies = [
        ('notifications', '0007_notification_cancel_permission'),
    ]

    operations = [
        AddIndexConcurrently(
            model_name='notification',
            index=models.Index(condition=models.Q(('priority', 'high')), fields=['id'], name='notifications_priority_idx'),
        ),
    ]
