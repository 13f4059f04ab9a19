# The admin's searches read these indexes (see NotificationAdmin.get_search_results).
# Built CONCURRENTLY, so a table of millions of rows keeps taking writes meanwhile; that
# cannot run inside a transaction, hence atomic = False.

import django.db.models.functions.comparison
import django.db.models.functions.text
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):

    atomic = False

    dependencies = [
        ('notifications', '0004_notification_sent_at_index'),
    ]

    operations = [
        AddIndexConcurrently(
            model_name='notification',
            index=models.Index(fields=['key'], name='notifications_key_prefix_idx', opclasses=['varchar_pattern_ops']),
        ),
        AddIndexConcurrently(
            model_name='notification',
            index=models.Index(django.db.models.functions.comparison.Collate(django.db.models.functions.text.Reverse(models.Func(django.db.models.functions.text.Lower('to'), models.Value('>'), function='RTRIM', output_field=models.TextField())), 'C'), name='notifications_to_suffix_idx'),
        ),
        AddIndexConcurrently(
            model_name='sentemail',
            index=models.Index(condition=models.Q(('message_id', ''), _negated=True), fields=['message_id'], name='notifications_sent_msgid_idx'),
        ),
    ]
